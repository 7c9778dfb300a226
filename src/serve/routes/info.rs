//! `GET /v1/models`, `GET /health` and `GET /metrics`.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::Served;
use crate::serve::error::ApiError;
use crate::serve::openai::{ModelCard, ModelList};

pub(super) async fn models(State(served): State<Served>, headers: HeaderMap) -> Response {
    let first = served.first();
    if let Err(e) = first.authorize(&headers) {
        return first.reject(e);
    }
    let data = served
        .0
        .iter()
        .map(|state| {
            let facts = state.engine.facts();
            let total = facts.and_then(|f| f.parameters.iter().find(|(c, _)| *c == "total"));
            ModelCard {
                id: state.info.name.clone(),
                object: "model",
                created: state.created,
                owned_by: "greencode",
                max_model_len: state.info.context_len,
                root: state.source.clone(),
                parameters: total.map(|&(_, n)| n as u64),
                pruned_from: facts.map(|f| f.pruned_from.clone()).filter(|p| !p.is_empty()),
                parameters_before_pruning: facts.and_then(|f| f.params_before_pruning),
                quantization: facts.map(|f| f.quantization),
            }
        })
        .collect();
    Json(ModelList { object: "list", data }).into_response()
}

pub(super) async fn health(State(served): State<Served>) -> Response {
    if served.first().engine.is_ready() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        ApiError::Unavailable("the model is still loading").into_response()
    }
}

pub(super) async fn metrics(State(served): State<Served>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        served.first().metrics.render(),
    )
        .into_response()
}
