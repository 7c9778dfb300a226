//! Chat prompts: the model's Jinja chat template from
//! `tokenizer_config.json` when it has one, else a plain documented
//! template for base models:
//!
//! ```text
//! {system content}\n\n            (system messages)
//! ### User:\n{content}\n\n        (user messages)
//! ### Assistant:\n{content}\n\n   (assistant messages)
//! ### Assistant:\n                (the generation prompt)
//! ```
//! With the plain template, generation also stops at `\n### `.

use std::path::Path;

use serde_json::Value;

use super::error::ApiError;

/// One message of a chat request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// How the served model turns messages into a prompt.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// A Jinja template from `tokenizer_config.json`.
    Jinja {
        /// Template source.
        source: String,
        /// `bos_token` for the template.
        bos: String,
        /// `eos_token` for the template.
        eos: String,
    },
    /// The plain template described in this module's documentation.
    Plain,
}

/// Stop string the plain template adds.
pub const PLAIN_STOP: &str = "\n### ";

impl ChatTemplate {
    /// Reads `chat_template` from `tokenizer_config.json` in `folder`, if present.
    pub fn from_folder(folder: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(folder.join("tokenizer_config.json")) else {
            return Self::Plain;
        };
        let Ok(cfg) = serde_json::from_str::<Value>(&text) else {
            return Self::Plain;
        };
        let token = |key: &str| match cfg.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_owned(),
            _ => String::new(),
        };
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned),
            _ => None,
        };
        match source {
            Some(source) => Self::Jinja {
                source,
                bos: token("bos_token"),
                eos: token("eos_token"),
            },
            None => Self::Plain,
        }
    }

    /// Extra stop strings the template implies.
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            Self::Plain => vec![PLAIN_STOP.to_owned()],
            Self::Jinja { .. } => Vec::new(),
        }
    }

    /// Renders the prompt for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, ApiError> {
        match self {
            Self::Plain => {
                let mut out = String::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" => out.push_str(&format!("{}\n\n", m.content)),
                        "assistant" => out.push_str(&format!("### Assistant:\n{}\n\n", m.content)),
                        _ => out.push_str(&format!("### User:\n{}\n\n", m.content)),
                    }
                }
                out.push_str("### Assistant:\n");
                Ok(out)
            }
            Self::Jinja { source, bos, eos } => {
                let mut env = minijinja::Environment::new();
                env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
                });
                env.add_template("chat", source)
                    .map_err(|e| ApiError::param("messages", format!("the model's chat template is invalid: {e}")))?;
                let tmpl = env.get_template("chat").expect("just added");
                tmpl.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(|e| ApiError::param("messages", format!("the chat template failed: {e}")))
            }
        }
    }
}

/// Parses `messages`: a non-empty list of `{role, content}` where content is
/// a string or a list of `{type: "text", text}` parts.
pub fn parse_messages(v: Option<Value>) -> Result<Vec<Message>, ApiError> {
    let bad = |i: usize, what: &str| ApiError::param(format!("messages[{i}]"), format!("`messages[{i}]`: {what}"));
    let Some(Value::Array(items)) = v else {
        return Err(ApiError::param("messages", "`messages` must be a non-empty list"));
    };
    if items.is_empty() {
        return Err(ApiError::param("messages", "`messages` must be a non-empty list"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(i, "`role` must be a string"))?;
            if !["system", "user", "assistant", "tool", "developer"].contains(&role) {
                return Err(bad(i, &format!("unknown role `{role}`")));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => Ok(t.to_owned()),
                            _ => Err(bad(i, "only text content parts are supported")),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(bad(i, "`content` must be a string or a list of text parts")),
            };
            Ok(Message {
                role: if role == "developer" {
                    "system".into()
                } else {
                    role.to_owned()
                },
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_template_renders_roles() {
        let msgs = parse_messages(Some(serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
        ])))
        .unwrap();
        assert_eq!(
            ChatTemplate::Plain.render(&msgs).unwrap(),
            "Be brief.\n\n### User:\nHi\n\n### Assistant:\n"
        );
    }

    #[test]
    fn jinja_template_renders() {
        let t = ChatTemplate::Jinja {
            source: "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".into(),
            bos: String::new(),
            eos: String::new(),
        };
        let msgs = vec![Message {
            role: "user".into(),
            content: "x".into(),
        }];
        assert_eq!(t.render(&msgs).unwrap(), "<|user|>x<|assistant|>");
    }

    #[test]
    fn bad_messages_are_named() {
        let e = parse_messages(Some(serde_json::json!([{"role": "wizard", "content": "x"}]))).unwrap_err();
        assert!(e.to_string().contains("messages[0]"), "{e}");
        assert!(parse_messages(Some(serde_json::json!([]))).is_err());
    }
}
