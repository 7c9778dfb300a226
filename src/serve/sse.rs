//! Server-sent events: engine events turned into SSE events by a task per
//! response, OpenAI's chunk stream (text and chat completions differ only in
//! their [`StreamShape`]), and errors as `error` events. When the client
//! leaves, the SSE channel closes, the task ends and drops the engine
//! receivers, which frees their slots at the next step.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::engine::Event;
use super::error::ApiError;
use super::openai::Usage;
use crate::generate::TokenLogprob;

/// A JSON `data:` event.
pub fn sse_json<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).expect("response types serialize"))
}

/// An `error` event with OpenAI's error body.
pub fn sse_error(e: &ApiError) -> SseEvent {
    SseEvent::default()
        .event("error")
        .data(serde_json::to_string(&e.body()).expect("error bodies serialize"))
}

/// The response body of a streamed route.
pub type SseStream = Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<SseEvent, Infallible>>>>;

/// Spawns a task that turns engine events into SSE events. When the client
/// leaves, the SSE channel closes, the task ends and drops the engine
/// receivers, which cancels generation at the next token.
pub fn sse_task<F>(make: F) -> SseStream
where
    F: FnOnce(mpsc::Sender<Result<SseEvent, Infallible>>) -> futures::future::BoxFuture<'static, ()>,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(make(tx));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// How an OpenAI stream's chunks look on the wire: text completions and
/// chat completions differ only here; the event loop is shared.
pub trait StreamShape: Send + 'static {
    /// A chunk sent before a choice's first token, if any.
    fn opening(&mut self, index: usize) -> Option<SseEvent>;
    /// New text of choice `index`.
    fn text(&mut self, index: usize, text: String, logprobs: &[TokenLogprob]) -> SseEvent;
    /// The last chunk of choice `index`.
    fn finish(&mut self, index: usize, reason: &'static str) -> SseEvent;
    /// The final usage chunk.
    fn usage(&mut self, usage: Usage) -> SseEvent;
}

/// Streams the jobs of a request (`choices_per_prompt` jobs per prompt) as
/// OpenAI SSE chunks in `shape`, then the optional usage chunk and
/// `[DONE]`. When the client leaves, the SSE channel closes, the task ends
/// and drops the engine receivers, which frees their slots at the next step.
pub fn stream_openai(
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    choices_per_prompt: usize,
    include_usage: bool,
    mut shape: impl StreamShape,
) -> SseStream {
    sse_task(move |tx| {
        Box::pin(async move {
            let mut usage = Usage::default();
            for (index, mut rx) in receivers.into_iter().enumerate() {
                if let Some(open) = shape.opening(index) {
                    if tx.send(Ok(open)).await.is_err() {
                        return;
                    }
                }
                while let Some(ev) = rx.recv().await {
                    let event = match ev {
                        Event::Text { text, logprobs } => shape.text(index, text, &logprobs),
                        Event::Done(d) => {
                            usage.add(&d, index % choices_per_prompt == 0);
                            shape.finish(index, d.finish_reason.as_str())
                        }
                        Event::Error(e) => {
                            let _ = tx.send(Ok(sse_error(&e))).await;
                            return;
                        }
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            if include_usage {
                let _ = tx.send(Ok(shape.usage(usage))).await;
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        })
    })
}
