//! Azure OpenAI: OpenAI's chat completions on deployment URLs.
//!
//! The body and the answers are OpenAI's (the OpenAI surface splices them as for OpenAI);
//! what differs is the request target, which names a deployment and the API version
//! (`{base}/openai/deployments/{deployment}/chat/completions?api-version=…`), and the key,
//! which goes in `api-key`. A model maps to its deployment through the provider's
//! `deployments` (a model without an entry is its own deployment name).

use super::openai::OpenAi;
use super::{ProviderAdapter, StreamDecoder};
use crate::config::ProviderConfig;
use crate::formats::canonical::{Answer, Request};
use komilion_sdk::ApiError;
use std::collections::HashMap;

/// The API version used when the provider's config names none (Azure's current GA version).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

pub struct Azure {
    api_version: String,
    deployments: HashMap<String, String>,
}

impl Azure {
    pub fn new(config: &ProviderConfig) -> Azure {
        Azure {
            api_version: config
                .api_version
                .clone()
                .unwrap_or_else(|| DEFAULT_API_VERSION.to_owned()),
            deployments: config.deployments.clone(),
        }
    }
}

/// What a deployment name may keep as is in the request target.
const DEPLOYMENT_IN_PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

impl ProviderAdapter for Azure {
    fn chat_target(&self, base_path: &str, model: &str, _stream: bool) -> String {
        let deployment = self.deployments.get(model).map_or(model, String::as_str);
        let deployment = percent_encoding::utf8_percent_encode(deployment, DEPLOYMENT_IN_PATH);
        let version = percent_encoding::utf8_percent_encode(&self.api_version, DEPLOYMENT_IN_PATH);
        format!("{base_path}/openai/deployments/{deployment}/chat/completions?api-version={version}")
    }

    fn target_names_model(&self) -> bool {
        true
    }

    fn speaks_openai_chat(&self) -> bool {
        true
    }

    fn auth_headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        vec![("api-key", api_key.to_owned())]
    }

    fn encode_request(&self, request: &Request, model: &str) -> Result<Vec<u8>, ApiError> {
        OpenAi.encode_request(request, model)
    }

    fn decode_answer(&self, body: &[u8]) -> Result<Answer, String> {
        OpenAi.decode_answer(body)
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        OpenAi.stream_decoder()
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> ApiError {
        OpenAi.decode_error(status, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_and_the_api_version_make_the_target() {
        let azure = Azure {
            api_version: "2024-10-21".into(),
            deployments: HashMap::from([("gpt-4o-mini".to_owned(), "prod-mini".to_owned())]),
        };
        assert_eq!(
            azure.chat_target("", "gpt-4o-mini", true),
            "/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            azure.chat_target("/base", "gpt-4o", false),
            "/base/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            azure.chat_target("", "a/b?c", false),
            "/openai/deployments/a%2Fb%3Fc/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(azure.auth_headers("k"), [("api-key", "k".to_owned())]);
    }
}
