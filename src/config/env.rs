//! `${ENV}` interpolation, applied to string values after YAML parsing (never to the raw text,
//! so a secret containing `:` or a newline cannot change the document's structure).

use komilion_sdk::ConfigIssue;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Convert YAML to JSON, expanding `${NAME}` in every string. `$${` stands for a literal `${`.
/// Unknown variables and non-string map keys are reported as issues.
pub(super) fn to_json_expanding_env(
    yaml: Yaml,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Vec<ConfigIssue>,
) -> Json {
    match yaml {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_u64() {
                Json::from(i)
            } else if let Some(i) = n.as_i64() {
                Json::from(i)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map_or(Json::Null, Json::Number)
            }
        }
        Yaml::String(s) => Json::String(expand(&s, path, env, issues)),
        Yaml::Sequence(items) => Json::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json_expanding_env(v, &format!("{path}[{i}]"), env, issues))
                .collect(),
        ),
        Yaml::Mapping(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s,
                    other => {
                        issues.push(ConfigIssue::new(
                            path,
                            format!("map keys must be strings, found {other:?}"),
                        ));
                        continue;
                    }
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                out.insert(key, to_json_expanding_env(v, &child, env, issues));
            }
            Json::Object(out)
        }
        Yaml::Tagged(tagged) => to_json_expanding_env(tagged.value, path, env, issues),
    }
}

fn expand(s: &str, path: &str, env: &dyn Fn(&str) -> Option<String>, issues: &mut Vec<ConfigIssue>) -> String {
    if !s.contains('$') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            match after.find('}') {
                Some(end) => {
                    let name = &after[..end];
                    match env(name) {
                        Some(value) => out.push_str(&value),
                        None => issues.push(ConfigIssue::new(
                            path,
                            format!("environment variable `{name}` is not set"),
                        )),
                    }
                    rest = &after[end + 1..];
                }
                None => {
                    issues.push(ConfigIssue::new(path, "unterminated `${`"));
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_escapes_and_reports_missing() {
        let env = |n: &str| (n == "A").then(|| "x:y\nz".to_owned());
        let mut issues = Vec::new();
        assert_eq!(expand("pre-${A}-post", "p", &env, &mut issues), "pre-x:y\nz-post");
        assert_eq!(expand("$${A} costs $5", "p", &env, &mut issues), "${A} costs $5");
        assert!(issues.is_empty());
        expand("${B}", "providers[0].api_key", &env, &mut issues);
        assert_eq!(issues[0].path, "providers[0].api_key");
        assert!(issues[0].message.contains("`B`"));
    }
}
