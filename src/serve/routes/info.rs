//! `GET /v1/models`, `GET /health` and `GET /metrics`.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;
use crate::serve::error::ApiError;
use crate::serve::openai::{ModelCard, ModelList};

pub(super) async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.authorize(&headers) {
        return state.reject(e);
    }
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.info.name.clone(),
            object: "model",
            created: state.created,
            owned_by: "greencode",
            max_model_len: state.info.context_len,
        }],
    })
    .into_response()
}

pub(super) async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_ready() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        ApiError::Unavailable("the model is still loading").into_response()
    }
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
