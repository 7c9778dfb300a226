//! From a request body to validated generation jobs: the body parsed into
//! its typed wire struct (`openai`) with errors that name the field, range
//! checks and defaults, and the prompts to run (tokenized, fitted and healed
//! in `prompt`). Nothing after this module re-checks input.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::chat::Message;
use super::error::ApiError;
use super::openai::{ChatMessageIn, CommonParams, Prompt, Stop};
use super::prompt::{Healing, ModelInfo, PromptInput};
use crate::generate::sampling::SamplingParams;

/// One generation the engine runs.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Prompt ids as run (after truncation and healing).
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings (the seed already offset per choice).
    pub sampling: SamplingParams,
    /// Stop strings, cut from the text.
    pub stop_strings: Vec<String>,
    /// Stop token ids (EOS, FIM end markers), never shown.
    pub stop_ids: Vec<u32>,
    /// Token healing, if applied.
    pub healing: Option<Healing>,
    /// Log-probabilities with this many alternatives, if asked for.
    pub logprobs: Option<usize>,
    /// Score the prompt too (echo with logprobs).
    pub prompt_logprobs: bool,
    /// Lines after the first must be indented this far (0: no rule; llama.cpp's `n_indent`).
    pub min_indent: usize,
    /// Stop at a newline once generating has taken this long (llama.cpp's `t_max_predict_ms`).
    pub max_predict: Option<std::time::Duration>,
}

/// Settings common to every choice of a request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most tokens per choice.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Choices per prompt.
    pub n: usize,
    /// Stream the answer.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Stop strings (matched in the text).
    pub stop: Vec<String>,
    /// Stop strings that name a special token (`<|fim_pad|>`, as Continue
    /// sends them): never shown as text, so they stop as token ids.
    pub stop_ids: Vec<u32>,
    /// Token healing on.
    pub token_healing: bool,
    /// Lines after the first must be indented this far (0: no rule).
    pub min_indent: usize,
    /// Stop at a newline once generating has taken this long.
    pub max_predict: Option<std::time::Duration>,
}

/// Most choices per request.
pub const MAX_N: usize = 16;
/// Most stop strings besides special tokens (OpenAI takes 4; Continue
/// sends up to a dozen to OpenAI-compatible servers, llama-server takes any number).
pub const MAX_STOP: usize = 16;

/// Parses a body as a JSON object.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::InvalidJson(format!(
            "expected a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A body of an OpenAI route: the endpoint's own fields `T` and the shared
/// [`CommonParams`], read from one JSON object. A field neither reads is
/// refused by name, as OpenAI does; a field of the wrong type is named too.
pub fn parse_request<T: DeserializeOwned>(body: &[u8]) -> Result<(T, CommonParams), ApiError> {
    let map = parse_object(body)?;
    let (own, common) = (field_names::<T>(), field_names::<CommonParams>());
    if let Some(field) = map
        .keys()
        .find(|k| !own.contains(&k.as_str()) && !common.contains(&k.as_str()))
    {
        return Err(ApiError::param(field.clone(), format!("unknown field `{field}`")));
    }
    let value = Value::Object(map);
    Ok((typed(&value)?, typed(&value)?))
}

/// A body read as `T`, whose unknown fields are ignored (llama.cpp's routes).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    typed(&Value::Object(parse_object(body)?))
}

/// Deserializes `value` as `T`, naming the field at fault.
fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // A flattened struct loses the path: the field that fails alone is it.
            if let Some(k) = value.as_object().and_then(|o| {
                o.iter()
                    .find(|(k, v)| serde_json::from_value::<T>(serde_json::json!({ k.as_str(): v })).is_err())
                    .map(|(k, _)| k.clone())
            }) {
                path = k;
            }
        }
        if let Some(field) = inner
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            let field = field.to_owned();
            return ApiError::param(field.clone(), format!("unknown field `{field}`"));
        }
        let param = if path == "." { String::new() } else { path };
        let message = match inner
            .strip_prefix("invalid type: ")
            .and_then(|t| t.split_once(", expected "))
        {
            // serde's "invalid type: string \"x\", expected a boolean".
            Some((got, expected)) => format!("`{param}` must be {}, got {}", plain_type(expected), plain_value(got)),
            // A union's own message ("must be a string or a list of strings").
            None if inner.starts_with("must ") || inner.starts_with("only ") => format!("`{param}` {inner}"),
            None => format!("`{param}`: {inner}"),
        };
        ApiError::param(param, message)
    })
}

/// A value as serde describes it (`floating point \`1.5\``, `string "x"`)
/// in the words of a JSON client.
fn plain_value(got: &str) -> String {
    match got.strip_prefix("floating point ") {
        Some(n) => format!("the number {}", n.trim_matches('`')),
        None => got.replace("integer `", "the integer `"),
    }
}

/// A type as serde names it (`i64`, `a sequence`, `struct X`) in the words
/// of a JSON client.
fn plain_type(expected: &str) -> &str {
    match expected {
        "i64" | "i32" => "an integer",
        "u64" | "u32" | "usize" => "a non-negative integer",
        "f64" | "f32" => "a number",
        "a sequence" => "a list",
        "a map" => "an object",
        e if e.starts_with("struct ") => "an object",
        e => e,
    }
}

/// The field names serde reads for the struct `T`.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The probe only records what `T` asks for and then fails on purpose.
    let _ = T::deserialize(FieldProbe(&mut fields));
    // A derived struct lists its fields; one that does not (flattened,
    // hand-written) would make every field of its endpoint unknown.
    debug_assert!(!fields.is_empty(), "{} lists no fields", std::any::type_name::<T>());
    fields
}

/// A deserializer that records the field list a struct asks for.
struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldProbe<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("field probe"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("field probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

fn range(param: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f64, ApiError> {
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if ok {
        Ok(v)
    } else {
        let open = if lo_open { "(" } else { "[" };
        Err(ApiError::param(
            param,
            format!("`{param}` must be in {open}{lo}, {hi}], got {v}"),
        ))
    }
}

/// Resolves defaults and checks ranges.
pub fn settings(p: &CommonParams, info: &ModelInfo, default_max_tokens: usize) -> Result<Settings, ApiError> {
    // One model is served: any `model` names it (as llama-server answers;
    // editors are configured with names of their own), and the response
    // says which model answered.
    let max_tokens = match (p.max_completion_tokens, p.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", v),
        (None, Some(v)) => ("max_tokens", v),
        (None, None) => ("max_tokens", default_max_tokens as i64),
    };
    if max_tokens.1 < 1 {
        return Err(ApiError::param(
            max_tokens.0,
            format!("`{}` must be at least 1, got {}", max_tokens.0, max_tokens.1),
        ));
    }
    let n = p.n.unwrap_or(1);
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(ApiError::param(
            "n",
            format!("`n` must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    let top_k = p.top_k.unwrap_or(0);
    if top_k < -1 {
        return Err(ApiError::param(
            "top_k",
            format!("`top_k` must be -1, 0 or positive, got {top_k}"),
        ));
    }
    let mut logit_bias = HashMap::new();
    for (k, &v) in p.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < info.vocab_size)
            .ok_or_else(|| {
                ApiError::param(
                    "logit_bias",
                    format!("`logit_bias` key {k:?} is not a token id of this model"),
                )
            })?;
        logit_bias.insert(id, range("logit_bias", v, -100.0, 100.0, false)? as f32);
    }
    let sampling = SamplingParams {
        temperature: range("temperature", p.temperature.unwrap_or(1.0), 0.0, 2.0, false)? as f32,
        top_p: range("top_p", p.top_p.unwrap_or(1.0), 0.0, 1.0, true)? as f32,
        top_k: top_k.max(0) as usize,
        min_p: range("min_p", p.min_p.unwrap_or(0.0), 0.0, 1.0, false)? as f32,
        repetition_penalty: range(
            "repetition_penalty",
            p.repetition_penalty.unwrap_or(1.0),
            0.0,
            2.0,
            true,
        )? as f32,
        presence_penalty: range("presence_penalty", p.presence_penalty.unwrap_or(0.0), -2.0, 2.0, false)? as f32,
        frequency_penalty: range(
            "frequency_penalty",
            p.frequency_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
            false,
        )? as f32,
        logit_bias,
        seed: p.seed.map(|s| s as u64),
        infill: None,
    };
    let stream = p.stream.unwrap_or(false);
    let include_usage = p.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    if p.stream_options.is_some() && !stream {
        return Err(ApiError::param(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    let (stop, stop_ids) = stops(p.stop.as_ref(), info)?;
    Ok(Settings {
        // More than the context can hold is cut to what the prompt leaves
        // (`BuiltPrompt::room`), as llama-server and Ollama do: editors
        // send one large default for every model.
        max_tokens: (max_tokens.1 as u64).min(info.context_len as u64) as usize,
        sampling,
        n: n as usize,
        stream,
        include_usage,
        stop,
        stop_ids,
        token_healing: p.token_healing.unwrap_or(true),
        min_indent: 0,
        max_predict: None,
    })
}

/// `stop`: a string or a list of non-empty strings, split into text to
/// match (at most [`MAX_STOP`]) and the ids of those that name a special
/// token (any number of them: an editor sends every FIM marker).
pub fn stops(v: Option<&Stop>, info: &ModelInfo) -> Result<(Vec<String>, Vec<u32>), ApiError> {
    let list = match v {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(list)) => list.clone(),
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "`stop` strings must not be empty"));
    }
    let (ids, text): (Vec<String>, Vec<String>) = list.into_iter().partition(|s| info.special_id(s).is_some());
    if text.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOP} strings besides special tokens, got {}",
                text.len()
            ),
        ));
    }
    Ok((text, ids.iter().filter_map(|s| info.special_id(s)).collect()))
}

/// `prompt` as the prompts to run, each id checked against the vocabulary.
pub fn prompts(v: Option<Prompt>, info: &ModelInfo, has_suffix: bool) -> Result<Vec<PromptInput>, ApiError> {
    let ids_of = |ids: Vec<u64>| -> Result<Vec<u32>, ApiError> {
        ids.into_iter()
            .map(|id| {
                if id as usize >= info.vocab_size {
                    return Err(ApiError::param(
                        "prompt",
                        format!("token id {id} is outside the vocabulary (size {})", info.vocab_size),
                    ));
                }
                Ok(id as u32)
            })
            .collect()
    };
    let list = match v {
        None if has_suffix => vec![PromptInput::Text(String::new())],
        None => return Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Prompt::Text(s)) => vec![PromptInput::Text(s)],
        Some(Prompt::Texts(list)) => list.into_iter().map(PromptInput::Text).collect(),
        Some(Prompt::Ids(ids)) => vec![PromptInput::Ids(ids_of(ids)?)],
        Some(Prompt::IdLists(lists)) => lists
            .into_iter()
            .map(|ids| ids_of(ids).map(PromptInput::Ids))
            .collect::<Result<_, _>>()?,
    };
    if list.len() > MAX_N {
        return Err(ApiError::param(
            "prompt",
            format!("at most {MAX_N} prompts per request, got {}", list.len()),
        ));
    }
    Ok(list)
}

/// `messages` as the chat template reads them: a non-empty list with known
/// roles (`developer` is read as `system`).
pub fn chat_messages(v: Option<Vec<ChatMessageIn>>) -> Result<Vec<Message>, ApiError> {
    let items = v.unwrap_or_default();
    if items.is_empty() {
        return Err(ApiError::param("messages", "`messages` must be a non-empty list"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::param(
                        format!("messages[{i}]"),
                        format!("`messages[{i}]`: unknown role `{other}`"),
                    ))
                }
            };
            Ok(Message {
                role: role.to_owned(),
                content: m.content.map(|c| c.0).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::prompt::tests::info;

    fn param_of(e: &ApiError) -> String {
        match e {
            ApiError::InvalidParam { param, .. } => param.clone(),
            other => panic!("not a parameter error: {other}"),
        }
    }

    #[test]
    fn request_bodies_are_typed_and_faults_are_named() {
        use crate::serve::openai::{ChatFields, CompletionFields};
        let (f, c) = parse_request::<CompletionFields>(
            br#"{"prompt": [[1, 2], [3]], "suffix": null, "echo": true, "stop": ["a", "b"], "max_tokens": 5}"#,
        )
        .unwrap();
        assert_eq!(f.prompt, Some(Prompt::IdLists(vec![vec![1, 2], vec![3]])));
        assert_eq!(f.suffix, None);
        assert_eq!(f.echo, Some(true));
        assert_eq!(c.stop, Some(Stop::Many(vec!["a".into(), "b".into()])));
        assert_eq!(c.max_tokens, Some(5));
        // An unknown field, a field of another endpoint, a wrong type, a bad union.
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "frobnicate": 1}"#).unwrap_err();
        assert_eq!(param_of(&e), "frobnicate");
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "messages": []}"#).unwrap_err();
        assert_eq!(param_of(&e), "messages");
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(param_of(&e), "max_tokens");
        let e = parse_request::<CompletionFields>(br#"{"prompt": [1, "a"]}"#).unwrap_err();
        assert_eq!(param_of(&e), "prompt");
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "stop": 5}"#).unwrap_err();
        assert_eq!(param_of(&e), "stop");
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "stream": true, "stream_options": {"x": 1}}"#)
            .unwrap_err();
        assert_eq!(param_of(&e), "x");
        assert!(matches!(
            parse_request::<CompletionFields>(b"[1]").unwrap_err(),
            ApiError::InvalidJson(_)
        ));
        let (chat, _) = parse_request::<ChatFields>(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        let msgs = chat_messages(chat.messages).unwrap();
        assert_eq!(msgs[0].content, "ab");
        let e = parse_request::<ChatFields>(br#"{"messages": [{"role": "user", "content": [{"type": "image"}]}]}"#)
            .unwrap_err();
        assert_eq!(param_of(&e), "messages[0]");
        assert!(e.to_string().contains("only text content parts are supported"), "{e}");
        // A message is an object, never a list; errors speak JSON, not Rust.
        let e = parse_request::<ChatFields>(br#"{"messages": [["user", "hi"]]}"#).unwrap_err();
        assert_eq!(param_of(&e), "messages[0]");
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "echo": "yes"}"#).unwrap_err();
        assert_eq!(e.to_string(), "`echo` must be a boolean, got string \"yes\"");
        let e = parse_request::<CompletionFields>(br#"{"prompt": "x", "max_tokens": 1.5}"#).unwrap_err();
        assert_eq!(e.to_string(), "`max_tokens` must be an integer, got the number 1.5");
        // llama.cpp's bodies flatten their generation fields: still named.
        let e = parse_body::<crate::serve::openai::InfillRequest>(br#"{"input_prefix": "x", "n_predict": "a"}"#)
            .unwrap_err();
        assert_eq!(param_of(&e), "n_predict");
        assert_eq!(e.to_string(), "`n_predict` must be an integer, got string \"a\"");
        let e = parse_request::<CompletionFields>(br#"{"prompt": []}"#).unwrap_err();
        assert_eq!(e.to_string(), "`prompt` must not be an empty list");
        // Every typed body lists its fields to the unknown-field check.
        for fields in [
            field_names::<CompletionFields>(),
            field_names::<ChatFields>(),
            field_names::<CommonParams>(),
        ] {
            assert!(!fields.is_empty());
        }
        assert!(field_names::<CompletionFields>().contains(&"best_of"));
        assert!(field_names::<CommonParams>().contains(&"max_completion_tokens"));
    }

    #[test]
    fn messages_need_known_roles_and_at_least_one_entry() {
        let msg = |role: &str| ChatMessageIn {
            role: role.into(),
            content: None,
        };
        let e = chat_messages(Some(vec![msg("user"), msg("wizard")])).unwrap_err();
        assert_eq!(param_of(&e), "messages[1]");
        assert!(e.to_string().contains("unknown role `wizard`"), "{e}");
        assert_eq!(param_of(&chat_messages(Some(vec![])).unwrap_err()), "messages");
        assert_eq!(param_of(&chat_messages(None).unwrap_err()), "messages");
        let m = chat_messages(Some(vec![msg("developer")])).unwrap();
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("system", ""));
    }

    #[test]
    fn prompts_check_ids_and_counts() {
        let info = info();
        let e = prompts(Some(Prompt::Ids(vec![1, 16384])), &info, false).unwrap_err();
        assert!(
            e.to_string().contains("token id 16384 is outside the vocabulary"),
            "{e}"
        );
        assert!(prompts(None, &info, false).is_err());
        assert!(matches!(
            prompts(None, &info, true).unwrap()[..],
            [PromptInput::Text(ref t)] if t.is_empty()
        ));
        let many = Prompt::Texts(vec!["a".into(); MAX_N + 1]);
        assert!(prompts(Some(many), &info, false).is_err());
        let info = crate::serve::prompt::tests::info();
        assert!(stops(Some(&Stop::Many(vec!["a".into(); MAX_STOP + 1])), &info).is_err());
        assert!(stops(Some(&Stop::One(String::new())), &info).is_err());
        // Special tokens stop as ids and do not count against the limit.
        let mut many = vec!["a".to_owned(); MAX_STOP];
        many.extend(["<|endoftext|>".to_owned(), "<|fim_prefix|>".to_owned()]);
        let (text, ids) = stops(Some(&Stop::Many(many)), &info).unwrap();
        assert_eq!(text.len(), MAX_STOP);
        assert_eq!(ids.len(), 2);
    }
}
