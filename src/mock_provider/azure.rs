//! Azure OpenAI on the wire: `POST /openai/deployments/{deployment}/chat/completions` and
//! `.../embeddings`, each with `?api-version=YYYY-MM-DD`.
//!
//! The bodies are OpenAI's (the same code path answers: [`super::chat_completion`] and
//! [`super::embeddings::openai`]); what is Azure's own is around them: the key in an `api-key`
//! header, the `api-version` query parameter, the errors Azure's gateway answers itself (its
//! `{"error":{"code":"401","message":...}}` shape, the code a string), the model named by the
//! deployment when the request names none, and Azure's headers (`apim-request-id`,
//! `x-ms-region`, `x-ratelimit-remaining-requests`/`-tokens`).

use super::openai::to_json;
use super::{chat_completion, embeddings, write_simple, Head, Keep, Limits, ReplyHeaders, State, Surface};
use serde_json::json;
use std::io;
use tokio::net::TcpStream;

/// The region the simulated resource is in.
const REGION: &str = "East US";

/// A request under `/openai/deployments/`.
pub(super) async fn serve(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    n: u64,
    headers: ReplyHeaders,
) -> io::Result<Keep> {
    let (path, query) = head.path.split_once('?').unwrap_or((&head.path, ""));
    // Until the body is read, only the instance default and the header say how to print.
    let pretty =
        super::behavior_for(state, head, &serde_json::Value::Null).map_or(state.config.behavior.pretty, |b| b.pretty);
    if let Some(key) = &state.config.api_key {
        if head.header("api-key") != Some(key.as_str()) {
            let body = error_body(401, "", pretty);
            return write_simple(stream, 401, "application/json", &body, &headers).await;
        }
    }
    let api_version = query_param(query, "api-version");
    let route = path
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(deployment, _)| !deployment.is_empty());
    let (Some(api_version), Some((deployment, operation))) = (api_version, route) else {
        let body = not_found(pretty);
        return write_simple(stream, 404, "application/json", &body, &headers).await;
    };
    let deployment = percent_encoding::percent_decode_str(deployment).decode_utf8_lossy();
    let surface = Surface::Azure {
        deployment: &deployment,
        api_version: &api_version,
    };
    match operation {
        "chat/completions" => chat_completion(stream, state, head, body, n, headers, surface).await,
        "embeddings" => embeddings::openai(stream, state, head, body, headers, surface).await,
        _ => {
            let body = not_found(pretty);
            write_simple(stream, 404, "application/json", &body, &headers).await
        }
    }
}

/// A query parameter's value, decoded (`+` as a space, `%XX` escapes).
pub(super) fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// What Azure answers for a path it does not serve, or without `api-version`.
fn not_found(pretty: bool) -> Vec<u8> {
    to_json(
        &json!({"error": {"code": "404", "message": "Resource not found"}}),
        pretty,
    )
}

/// The error body for `status`: Azure's gateway's own for a bad key, a missing deployment and
/// a rate limit; OpenAI's (which Azure passes on from the model) for the rest.
pub(super) fn error_body(status: u16, api_version: &str, pretty: bool) -> Vec<u8> {
    let (code, message) = match status {
        401 => (
            "401".to_owned(),
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key \
             for an active subscription and use a correct regional API endpoint for your resource."
                .to_owned(),
        ),
        404 => (
            "DeploymentNotFound".to_owned(),
            "The API deployment for this resource does not exist. If you created the deployment within the last 5 \
             minutes, please wait a moment and try again."
                .to_owned(),
        ),
        429 => (
            "429".to_owned(),
            format!(
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version {api_version} have \
                 exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second. Please \
                 go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate \
                 limit."
            ),
        ),
        _ => return super::openai::error_body(status, pretty),
    };
    to_json(&json!({"error": {"code": code, "message": message}}), pretty)
}

/// The headers Azure sends with every answer: its gateway's request id (also as `x-request-id`),
/// the region, and the requests and tokens left (and when to retry, on a 429).
pub(super) fn headers(request_id: &str, limits: &Limits) -> String {
    let mut out = format!(
        "apim-request-id: {request_id}\r\nx-request-id: {request_id}\r\nx-ms-region: {REGION}\r\n\
         x-ratelimit-remaining-requests: {}\r\nx-ratelimit-remaining-tokens: {}\r\n",
        limits.remaining_requests, limits.remaining_tokens,
    );
    if limits.limited {
        out.push_str("retry-after: 1\r\nretry-after-ms: 1000\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::mock_provider::{Behavior, MockConfig, MockProvider};
    use serde_json::{json, Value};
    use std::net::SocketAddr;

    const KEY: &str = "azure-test-key";

    async fn start(api_key: Option<&str>) -> MockProvider {
        let config = MockConfig {
            api_key: api_key.map(str::to_owned),
            behavior: Behavior::default(),
            ..MockConfig::default()
        };
        MockProvider::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap()
    }

    fn url(mock: &MockProvider, path: &str) -> String {
        format!("http://{}{path}", mock.addr())
    }

    const CHAT: &str = "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21";

    async fn post(mock: &MockProvider, path: &str, key: Option<&str>, body: Value) -> reqwest::Response {
        let mut request = reqwest::Client::new().post(url(mock, path)).json(&body);
        if let Some(key) = key {
            request = request.header("api-key", key);
        }
        request.send().await.unwrap()
    }

    fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
        resp.headers()
            .get(name)
            .unwrap_or_else(|| panic!("{name} is sent"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn a_deployment_answers_openais_body_with_azures_headers() {
        let mock = start(Some(KEY)).await;
        let resp = post(
            &mock,
            CHAT,
            Some(KEY),
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let id = header(&resp, "apim-request-id").to_owned();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "4", "a version 4 UUID: {id}");
        assert_eq!(header(&resp, "x-request-id"), id);
        assert_eq!(header(&resp, "x-ms-region"), "East US");
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "9999");
        let tokens_left: u64 = header(&resp, "x-ratelimit-remaining-tokens").parse().unwrap();
        for openai in [
            "openai-processing-ms",
            "x-ratelimit-limit-requests",
            "x-ratelimit-reset-tokens",
        ] {
            assert!(resp.headers().get(openai).is_none(), "{openai}");
        }
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "my-gpt4o", "no model in the request: the deployment's");
        assert!(v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Echo: hi"));
        let usage = &v["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            tokens_left,
            super::super::LIMIT_TOKENS - usage["total_tokens"].as_u64().unwrap()
        );

        // The request's model, when it names one, and a stream, as OpenAI's.
        let body = post(
            &mock,
            CHAT,
            Some(KEY),
            json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}],
                "mock": {"chunks": 3}}),
        )
        .await
        .text()
        .await
        .unwrap();
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        let first: Value = serde_json::from_str(body.lines().next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(first["model"], "gpt-4o");
        assert_eq!(
            body.matches("\"content\":\"").count(),
            4,
            "the role chunk and three pieces"
        );
    }

    #[tokio::test]
    async fn the_key_and_api_version_are_required() {
        let mock = start(Some(KEY)).await;
        let ask = json!({"messages": [{"role": "user", "content": "hi"}]});
        for key in [None, Some("wrong")] {
            let resp = post(&mock, CHAT, key, ask.clone()).await;
            assert_eq!(resp.status(), 401);
            assert!(resp.headers().get("apim-request-id").is_some());
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "401");
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Access denied due to invalid subscription key"));
        }
        // A bearer token is not Azure's key header.
        let resp = reqwest::Client::new()
            .post(url(&mock, CHAT))
            .bearer_auth(KEY)
            .json(&ask)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        for path in [
            "/openai/deployments/my-gpt4o/chat/completions",
            "/openai/deployments/my-gpt4o/completions?api-version=2024-10-21",
        ] {
            let resp = post(&mock, path, Some(KEY), ask.clone()).await;
            assert_eq!(resp.status(), 404, "{path}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v, json!({"error": {"code": "404", "message": "Resource not found"}}));
        }
    }

    #[tokio::test]
    async fn failures_have_azures_bodies_and_retry_headers() {
        let mock = start(None).await;
        let resp = post(
            &mock,
            CHAT,
            None,
            json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"fail_status": 429}}),
        )
        .await;
        assert_eq!(resp.status(), 429);
        assert_eq!(header(&resp, "retry-after"), "1");
        assert_eq!(header(&resp, "retry-after-ms"), "1000");
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "0");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "429");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API version 2024-10-21"));

        let resp = post(
            &mock,
            CHAT,
            None,
            json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"fail_status": 500}}),
        )
        .await;
        assert_eq!(resp.status(), 500);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "server_error", "the model's errors are OpenAI's");

        // The planner's refusals are OpenAI's too.
        let resp = post(
            &mock,
            CHAT,
            None,
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 0}),
        )
        .await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "n");
    }
}
