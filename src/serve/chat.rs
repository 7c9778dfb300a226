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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_template_renders_roles() {
        let msgs = vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
        ];
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
}
