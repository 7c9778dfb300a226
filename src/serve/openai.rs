//! OpenAI wire types (and llama.cpp's `/infill`): the JSON the server reads
//! and writes, and nothing else. Every request body becomes one of the typed
//! structs here (`validate::parse_request` names the field at fault);
//! unions such as `prompt`, `stop` and message `content` are enums with
//! their own messages. Ranges and model-dependent checks are `validate`'s.

use std::collections::HashMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Sampling and output parameters shared by `/v1/completions` and
/// `/v1/chat/completions`, read from the same JSON object as the
/// endpoint's own fields ([`CompletionFields`], [`ChatFields`]).
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Served model name.
    pub model: Option<String>,
    /// Most tokens to generate (OpenAI default 16 for completions).
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// 0–2; 0 is greedy.
    pub temperature: Option<f64>,
    /// (0, 1].
    pub top_p: Option<f64>,
    /// 0 or -1 disables.
    pub top_k: Option<i64>,
    /// [0, 1].
    pub min_p: Option<f64>,
    /// Choices per prompt.
    pub n: Option<i64>,
    /// Server-sent events.
    pub stream: Option<bool>,
    /// `include_usage`.
    pub stream_options: Option<StreamOptions>,
    /// A string or up to 4 strings.
    pub stop: Option<Stop>,
    /// [-2, 2].
    pub presence_penalty: Option<f64>,
    /// [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// (0, 2].
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
    /// Same seed, same output.
    pub seed: Option<i64>,
    /// End-user id (logged, not used).
    pub user: Option<String>,
    /// Token healing of a prompt that ends mid-token (default on).
    pub token_healing: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// `"stop": "x"`.
    One(String),
    /// `"stop": ["x", "y"]`.
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = || D::Error::custom("must be a string or a list of strings");
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::One(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()
                .map(Self::Many),
            _ => Err(bad()),
        }
    }
}

/// `prompt`: text, token ids, or a batch of either.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts, one choice set each.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Ids(Vec<u64>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<u64>>),
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad =
            || D::Error::custom("must be a string, a list of strings, a list of token ids or a list of token-id lists");
        let ids = |items: &[Value]| {
            items
                .iter()
                .map(|i| i.as_u64().ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()
        };
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(items) if items.is_empty() => Err(D::Error::custom("must not be an empty list")),
            Value::Array(items) => match &items[0] {
                Value::String(_) => items
                    .into_iter()
                    .map(|i| match i {
                        Value::String(s) => Ok(s),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()
                    .map(Self::Texts),
                Value::Number(_) => ids(&items).map(Self::Ids),
                Value::Array(_) => items
                    .iter()
                    .map(|i| match i {
                        Value::Array(inner) if !inner.is_empty() => ids(inner),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()
                    .map(Self::IdLists),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// The fields of `/v1/completions` (and `/v1/fim/completions`) beside [`CommonParams`].
#[derive(Debug, Default, Deserialize)]
pub struct CompletionFields {
    /// The prompt (may be absent when `suffix` is given).
    pub prompt: Option<Prompt>,
    /// Text after the cursor: fill-in-the-middle.
    pub suffix: Option<String>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    /// Log-probabilities of this many alternatives (0–5).
    pub logprobs: Option<i64>,
    /// Only 1 is supported.
    pub best_of: Option<i64>,
    /// The prompt is used exactly as given, special tokens and all, with
    /// no token healing (Continue builds its own FIM prompt and sends this).
    pub raw: Option<bool>,
    /// Mistral's name for `seed` (its `/v1/fim/completions`, as Tabby sends it).
    pub random_seed: Option<i64>,
}

/// The fields of `/v1/chat/completions` beside [`CommonParams`].
#[derive(Debug, Default, Deserialize)]
pub struct ChatFields {
    /// The conversation.
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Chat log-probabilities (refused: use `/v1/completions`).
    pub logprobs: Option<bool>,
    /// Alternatives per token with `logprobs`.
    pub top_logprobs: Option<i64>,
}

/// One message of a chat request (a JSON object; errors inside it are
/// reported as `messages[i]`).
#[derive(Debug, Clone)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text, or a list of text parts (absent or `null`: empty).
    pub content: Option<MessageContent>,
}

impl<'de> Deserialize<'de> for ChatMessageIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The fields, read once the message is known to be an object (a
        /// derived struct alone would also take `["user", "hi"]`).
        #[derive(Deserialize)]
        struct Fields {
            role: String,
            content: Option<MessageContent>,
        }
        let object = serde_json::Map::<String, Value>::deserialize(d)?;
        let f = Fields::deserialize(Value::Object(object)).map_err(D::Error::custom)?;
        Ok(Self {
            role: f.role,
            content: f.content,
        })
    }
}

/// A message's `content`: a string or a list of `{type: "text", text}` parts.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageContent(pub String);

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self(s)),
            Value::Array(parts) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => Ok(t.to_owned()),
                        _ => Err(D::Error::custom("only text content parts are supported")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|texts| Self(texts.join(""))),
            _ => Err(D::Error::custom("must be a string or a list of text parts")),
        }
    }
}

/// Token counts of a response, and what it cost.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Usage {
    /// Tokens of the prompt(s) as run.
    pub prompt_tokens: usize,
    /// Tokens generated over all choices.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// `cached_tokens`: prompt tokens served from a cached prefix.
    pub prompt_tokens_details: PromptTokensDetails,
    /// Speculative decoding's draft tokens, accepted and rejected (OpenAI's
    /// names for predicted tokens); absent when nothing was drafted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// Energy attributed to this request (J).
    pub energy_joules: f64,
    /// Floating-point operations executed for it (analytic, from the real shapes).
    pub flops: u64,
    /// Estimated emissions (g CO2e): energy × grid intensity × PUE.
    pub co2_grams: f64,
    /// This process's GPU memory at the end of the request (null on CPU).
    pub gpu_memory_bytes: Option<u64>,
    /// `nvml`, `rapl` or `estimated`.
    pub energy_source: &'static str,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused, not recomputed.
    pub cached_tokens: usize,
}

/// OpenAI's `usage.completion_tokens_details`, as speculative decoding fills it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionTokensDetails {
    /// Draft tokens the model agreed with.
    pub accepted_prediction_tokens: usize,
    /// Draft tokens it did not.
    pub rejected_prediction_tokens: usize,
}

impl Usage {
    /// Adds one finished job's counts and costs (`count_prompt`: whether its
    /// prompt is new to this response, not another choice of the same prompt).
    pub fn add(&mut self, done: &super::engine::Done, count_prompt: bool) {
        if count_prompt {
            self.prompt_tokens += done.prompt_tokens;
        }
        self.prompt_tokens_details.cached_tokens += done.cached_tokens;
        self.completion_tokens += done.completion_tokens;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
        if done.drafted > 0 {
            let d = self.completion_tokens_details.get_or_insert_with(Default::default);
            d.accepted_prediction_tokens += done.accepted;
            d.rejected_prediction_tokens += done.drafted - done.accepted;
        }
        self.energy_joules += done.cost.energy_joules;
        self.flops += done.cost.flops;
        self.co2_grams += done.cost.co2_grams;
        self.gpu_memory_bytes = match (self.gpu_memory_bytes, done.cost.gpu_memory_bytes) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.energy_source = done.cost.energy_source;
    }
}

/// One position's alternatives as a JSON object `{text: logprob}` whose
/// keys come most likely first (OpenAI's order); a text two tokens share
/// keeps the likelier one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs(Vec<(String, f32)>);

impl FromIterator<(String, f32)> for TopLogprobs {
    /// Collects alternatives already ordered most likely first.
    fn from_iter<I: IntoIterator<Item = (String, f32)>>(iter: I) -> Self {
        let mut out: Vec<(String, f32)> = Vec::new();
        for (text, lp) in iter {
            if !out.iter().any(|(t, _)| *t == text) {
                out.push((text, lp));
            }
        }
        Self(out)
    }
}

impl Serialize for TopLogprobs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (text, lp) in &self.0 {
            map.serialize_entry(text, lp)?;
        }
        map.end()
    }
}

/// Legacy completions `logprobs` object.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Log-probability of each token (`null` for the first echoed prompt token).
    pub token_logprobs: Vec<Option<f32>>,
    /// The most likely alternatives at each position, most likely first.
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<usize>,
}

/// One choice of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Generated text.
    pub text: String,
    /// Position among the choices.
    pub index: usize,
    /// Token log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` (`null` in non-final stream chunks).
    pub finish_reason: Option<&'static str>,
}

/// `/v1/completions` response, and each of its stream chunks.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (`null` in stream chunks other than the usage chunk).
    pub usage: Option<Usage>,
}

/// A chat message as returned.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Position among the choices.
    pub index: usize,
    /// The reply.
    pub message: ChatMessage,
    /// Always `null` (chat logprobs are not offered).
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// `/v1/chat/completions` response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The `delta` of a chat stream chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Position among the choices.
    pub index: usize,
    /// What is new.
    pub delta: ChatDelta,
    /// Always `null`.
    pub logprobs: Option<Value>,
    /// Set in the last chunk of a choice.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    /// Same for every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the usage chunk.
    pub usage: Option<Usage>,
}

/// Generation fields llama.cpp's routes (`/infill`, `/completion`) share.
#[derive(Debug, Default, Deserialize)]
pub struct LlamaParams {
    /// Most tokens to generate (-1: up to the context; 0: only fill the cache).
    pub n_predict: Option<i64>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Top-k.
    pub top_k: Option<i64>,
    /// Top-p.
    pub top_p: Option<f64>,
    /// Min-p.
    pub min_p: Option<f64>,
    /// Stream as server-sent events.
    pub stream: Option<bool>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Seed.
    pub seed: Option<i64>,
    /// Repetition penalty.
    pub repeat_penalty: Option<f64>,
    /// Lines after the first must be indented this far (≤ 0: no rule).
    pub n_indent: Option<i64>,
    /// Stop at a newline once generating has taken this many ms (≤ 0: no limit).
    pub t_max_predict_ms: Option<i64>,
    /// Candidates to generate from the one prompt (default 1).
    pub n_cmpl: Option<i64>,
    /// The sampler chain: a list of names (`["top_k", "top_p", "infill"]`)
    /// or their letters (`"kpi"`); samplers left out are off.
    pub samplers: Option<Value>,
    /// Only these fields of the final answer, named by path (`timings/prompt_n`)
    /// and returned flat under that name (none: the whole answer).
    pub response_fields: Option<Vec<String>>,
}

/// llama.cpp's `/infill` request (unknown fields are ignored, as llama.cpp does).
#[derive(Debug, Default, Deserialize)]
pub struct InfillRequest {
    /// Text before the cursor.
    #[serde(default)]
    pub input_prefix: String,
    /// Text after the cursor.
    #[serde(default)]
    pub input_suffix: String,
    /// Other files for context.
    #[serde(default)]
    pub input_extra: Vec<InfillExtra>,
    /// Text appended to the prefix (llama.cpp: the current line up to the cursor).
    #[serde(default)]
    pub prompt: String,
    /// Generation settings.
    #[serde(flatten)]
    pub params: LlamaParams,
}

/// llama.cpp's `/completion` request (unknown fields are ignored, as llama.cpp does).
#[derive(Debug, Default, Deserialize)]
pub struct LlamaCompletionRequest {
    /// The prompt: text or token ids.
    pub prompt: Option<Prompt>,
    /// Generation settings.
    #[serde(flatten)]
    pub params: LlamaParams,
}

/// One extra file of an `/infill` request.
#[derive(Debug, Default, Deserialize)]
pub struct InfillExtra {
    /// Its name.
    #[serde(default)]
    pub filename: String,
    /// Its text.
    #[serde(default)]
    pub text: String,
}

/// llama.cpp's `/infill` and `/completion` response (and stream event).
#[derive(Debug, Clone, Serialize)]
pub struct LlamaResponse {
    /// Which candidate (`n_cmpl`) this is.
    pub index: usize,
    /// Generated text (a piece of it when streaming).
    pub content: String,
    /// Whether this is the last event.
    pub stop: bool,
    /// Served model name.
    pub model: String,
    /// Tokens generated.
    pub tokens_predicted: usize,
    /// Prompt tokens.
    pub tokens_evaluated: usize,
    /// Prompt tokens reused from the cache instead of computed.
    pub tokens_cached: usize,
    /// `eos`, `limit` or `word` when stopped, else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_type: Option<&'static str>,
    /// Where the time went (the last event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// Whether the prompt was cut to fit the context (the last event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    /// The settings the answer was generated with (the last event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_settings: Option<GenerationSettings>,
}

/// llama.cpp's `generation_settings` (what llama.vscode's status bar reads).
#[derive(Debug, Clone, Serialize)]
pub struct GenerationSettings {
    /// The model's context length.
    pub n_ctx: usize,
    /// Most tokens the request could generate.
    pub n_predict: usize,
    /// Served model name.
    pub model: String,
    /// Sampling temperature.
    pub temperature: f64,
    /// Seed, when the request gave one.
    pub seed: Option<u64>,
}

/// llama.cpp's `timings` object.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Prompt tokens reused from the cache.
    pub cache_n: usize,
    /// Prompt tokens computed.
    pub prompt_n: usize,
    /// Time until the prompt was in the cache (queue and prefill), ms.
    pub prompt_ms: f64,
    /// `prompt_ms` per computed prompt token.
    pub prompt_per_token_ms: f64,
    /// Computed prompt tokens per second.
    pub prompt_per_second: f64,
    /// Tokens generated.
    pub predicted_n: usize,
    /// Generation time, ms.
    pub predicted_ms: f64,
    /// `predicted_ms` per generated token.
    pub predicted_per_token_ms: f64,
    /// Generated tokens per second.
    pub predicted_per_second: f64,
}

/// `/v1/models` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// Served model name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds of loading.
    pub created: u64,
    /// `greencode`.
    pub owned_by: &'static str,
    /// Context length.
    pub max_model_len: usize,
    /// Where it was loaded from (vLLM's `root`).
    pub root: String,
    /// Parameters (unique tensors; None while loading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// The model it was pruned from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned_from: Option<String>,
    /// Parameters of that model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters_before_pruning: Option<u64>,
    /// The weight format decode runs on (`none` for full precision).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<&'static str>,
}

/// `/v1/models` response.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served models.
    pub data: Vec<ModelCard>,
}

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The `error` object.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, …
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
}
