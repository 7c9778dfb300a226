//! Every way a request can fail, mapped to an HTTP status and OpenAI's error
//! JSON in one place. Streams send the same body as an SSE `error` event.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::openai::{ErrorBody, ErrorDetail};

/// A request failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON (or not UTF-8, or nested too deeply).
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// A field is missing, of the wrong type, out of range or unknown.
    #[error("{message}")]
    InvalidParam {
        /// The field.
        param: String,
        /// What is wrong.
        message: String,
    },
    /// The prompt (plus `max_tokens`) does not fit the context.
    #[error("this model's maximum context length is {context} tokens; the prompt has {prompt} tokens and max_tokens is {max_tokens} ({total} in all)", total = prompt + max_tokens)]
    ContextLength {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// The model's context.
        context: usize,
        /// `prompt` or `messages`.
        param: &'static str,
    },
    /// The prompt's text is longer than any tokenization of it could fit.
    #[error("this model's maximum context length is {context} tokens; the prompt's {bytes} bytes cannot fit in it (no token holds more than {max_token_bytes} bytes)")]
    PromptTooLong {
        /// Bytes of the prompt.
        bytes: usize,
        /// The model's context.
        context: usize,
        /// Bytes of the model's longest token.
        max_token_bytes: usize,
    },
    /// The prompt plus `max_tokens` needs more KV cache than the whole pool holds.
    #[error("the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) needs more KV cache than this server's pool holds ({positions} positions; the server sets it with --kv-cache-mb)")]
    KvBudget {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// Positions the pool holds.
        positions: usize,
    },
    /// `suffix` was given but the model has no FIM tokens.
    #[error("this model has no fill-in-the-middle tokens, so `suffix` cannot be used")]
    NoFim,
    /// The body exceeds the size limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The queue is full.
    #[error("the server is at capacity ({max_queue} requests queued or running); retry after {retry_after_s} s")]
    QueueFull {
        /// The bound.
        max_queue: usize,
        /// Suggested wait.
        retry_after_s: u64,
    },
    /// Missing or wrong API key.
    #[error("invalid or missing API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The request names another model.
    #[error("the model `{0}` does not exist; this server serves {1}")]
    ModelNotFound(String, String),
    /// No such route.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// Wrong HTTP method for a route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The model is still loading or the server is stopping.
    #[error("{0}")]
    Unavailable(&'static str),
    /// A failure inside the server (details are logged, not sent).
    #[error("internal error while generating")]
    Internal,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParam {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidParam { .. }
            | Self::ContextLength { .. }
            | Self::PromptTooLong { .. }
            | Self::KvBudget { .. }
            | Self::NoFim => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(..) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code): (&'static str, Option<String>, Option<&'static str>) = match self {
            Self::InvalidJson(_) => ("invalid_request_error", None, Some("invalid_json")),
            Self::InvalidParam { param, .. } => ("invalid_request_error", Some(param.clone()), None),
            Self::ContextLength { param, .. } => (
                "invalid_request_error",
                Some((*param).to_owned()),
                Some("context_length_exceeded"),
            ),
            Self::PromptTooLong { .. } => (
                "invalid_request_error",
                Some("prompt".into()),
                Some("context_length_exceeded"),
            ),
            Self::KvBudget { .. } => (
                "invalid_request_error",
                Some("max_tokens".into()),
                Some("context_length_exceeded"),
            ),
            Self::NoFim => (
                "invalid_request_error",
                Some("suffix".into()),
                Some("fim_not_supported"),
            ),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", None, Some("payload_too_large")),
            Self::QueueFull { .. } => ("server_overloaded", None, Some("queue_full")),
            Self::Unauthorized => ("authentication_error", None, Some("invalid_api_key")),
            Self::ModelNotFound(..) => ("invalid_request_error", Some("model".into()), Some("model_not_found")),
            Self::RouteNotFound(_) => ("invalid_request_error", None, Some("not_found")),
            Self::MethodNotAllowed => ("invalid_request_error", None, Some("method_not_allowed")),
            Self::Unavailable(_) => ("server_error", None, Some("unavailable")),
            Self::Internal => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Self::QueueFull { retry_after_s, .. } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        resp
    }
}
