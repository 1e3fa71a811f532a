//! `align serve`: the OpenAI API over the core's continuous-batching engine. `GET /v1/models`,
//! `POST /v1/chat/completions` (the model's chat template, streaming with server-sent events,
//! log-probabilities), `POST /v1/completions` (`echo` + `logprobs` for harnesses that score
//! log-likelihoods), `GET /health`, `GET /metrics` (Prometheus), and the web console at `/`.
//! Several LoRA adapters are served on one base: the request's `model` picks the base or an
//! adapter, and requests for different adapters share a batch.
mod api;
mod console;
mod metrics;
mod text;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use align_core::eval::answers::stop_token_ids;
use align_core::infer::engine::{check_fits, EngineRequest, LogitAdjustments, TokenLogprob};
use align_core::infer::generate::SamplingConfig;
use align_core::load::spec::{AdapterMode, ModelSpec};
use align_core::model::quant::Quantization;
use align_core::peft::lora::load_adapter_bank;
use align_core::text::chat::ChatMessage;
use align_core::ModelTokenizer;
use anyhow::{anyhow, bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use api::{ApiError, ApiResult, Common, Prompt};
use metrics::Metrics;
use text::{token_bytes, Delta};
use worker::{Event, Job, Slot};

pub use console::board_page;
pub use text::ChoiceText;

/// What `align serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Model folder or cached hub id.
    pub model: String,
    pub device: String,
    pub dtype: Option<String>,
    pub threads: Option<i32>,
    /// One adapter of any kind served as the model itself (merged or attached, as `generate`).
    pub adapter: Option<String>,
    /// Named LoRA adapters served beside the base, selected by the request's `model`.
    pub adapters: Vec<(String, PathBuf)>,
    pub quantize: Option<Quantization>,
    pub host: String,
    /// 0: any free port (the address is printed).
    pub port: u16,
    pub api_key: Option<String>,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; past it requests get 429 at once.
    pub max_queue: usize,
    /// Context limit (prompt + new tokens); default the model's max_position_embeddings.
    pub max_model_len: Option<usize>,
    /// The base model's id in the API (default: the --model value).
    pub served_model_name: Option<String>,
    /// How long running requests may take to finish after SIGTERM / Ctrl-C.
    pub shutdown_timeout: Duration,
    /// Run folders the console's dashboard shows.
    pub runs: Vec<PathBuf>,
}

struct ModelEntry {
    id: String,
    adapter: Option<usize>,
    root: String,
}

struct AppState {
    tokenizer: ModelTokenizer,
    models: Vec<ModelEntry>,
    context: usize,
    eos: Vec<i64>,
    vocab: i64,
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    api_key: Option<String>,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    runs: Vec<PathBuf>,
}

struct Ready {
    tokenizer: ModelTokenizer,
    context: usize,
    eos: Vec<i64>,
    vocab: i64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Loads the model on its own thread, binds the address and serves until SIGTERM / Ctrl-C.
pub fn serve(opts: ServeOptions) -> Result<()> {
    if opts.max_batch == 0 {
        bail!("--max-batch: expected at least 1");
    }
    if opts.adapter.is_some() && !opts.adapters.is_empty() {
        bail!("--adapter: give one adapter folder served as the model, or named LoRA adapters NAME=DIR, not both");
    }
    let mut seen = std::collections::BTreeSet::new();
    let base_id = opts.served_model_name.clone().unwrap_or_else(|| opts.model.clone());
    seen.insert(base_id.clone());
    for (name, dir) in &opts.adapters {
        if !seen.insert(name.clone()) {
            bail!("--adapter {name}={}: the name {name:?} is used twice", dir.display());
        }
        if !dir.is_dir() {
            bail!("--adapter {name}={}: no such adapter folder", dir.display());
        }
    }
    let spec =
        ModelSpec::from_flags(&opts.model, opts.adapter.as_deref(), &opts.device, opts.dtype.as_deref(), opts.threads)?
            .quantized(opts.quantize);
    let metrics = Arc::new(Metrics::default());
    let shutdown = Arc::new(AtomicBool::new(false));
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready>>();
    let bank_dirs: Vec<PathBuf> = opts.adapters.iter().map(|(_, d)| d.clone()).collect();
    let (max_batch, max_model_len) = (opts.max_batch, opts.max_model_len);
    let worker_metrics = metrics.clone();
    let worker_shutdown = shutdown.clone();
    let worker = std::thread::Builder::new().name("align-serve-model".into()).spawn(move || {
        let loaded = (|| -> Result<_> {
            let mut loaded = spec.causal_lm(AdapterMode::Merge)?;
            if !bank_dirs.is_empty() {
                load_adapter_bank(&mut loaded.model.lm, &bank_dirs)?;
            }
            // the handlers' copy of the tokenizer the model was loaded with
            let tokenizer = spec.tokenizer()?;
            Ok((loaded, tokenizer))
        })();
        let (loaded, tokenizer) = match loaded {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let lm = &loaded.model.lm;
        let model_context = lm.config.max_position_embeddings.max(1) as usize;
        let context = max_model_len.map_or(model_context, |m| m.min(model_context));
        let eos = stop_token_ids(&loaded.tokenizer, &lm.config.eos_token_ids);
        let pad = loaded.tokenizer.padding_id();
        let _ = ready_tx.send(Ok(Ready { tokenizer, context, eos, vocab: lm.config.vocab_size }));
        worker::run(lm, pad, max_batch, job_rx, worker_metrics, worker_shutdown);
    })?;
    let ready = ready_rx.recv().map_err(|_| anyhow!("the model's thread stopped while loading"))??;
    let mut models = vec![ModelEntry { id: base_id, adapter: None, root: opts.model.clone() }];
    for (i, (name, dir)) in opts.adapters.iter().enumerate() {
        models.push(ModelEntry { id: name.clone(), adapter: Some(i), root: dir.display().to_string() });
    }
    let state = Arc::new(AppState {
        tokenizer: ready.tokenizer,
        models,
        context: ready.context,
        eos: ready.eos,
        vocab: ready.vocab,
        jobs: Mutex::new(job_tx),
        in_flight: Arc::new(AtomicUsize::new(0)),
        limit: opts.max_batch + opts.max_queue,
        api_key: opts.api_key.clone(),
        metrics,
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        runs: opts.runs.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).build()?;
    let result = runtime.block_on(run_http(state.clone(), &opts));
    shutdown.store(true, Ordering::SeqCst);
    // the job channel closes with the state: the worker ends after its last job
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = worker.join();
    result
}

async fn run_http(state: Arc<AppState>, opts: &ServeOptions) -> Result<()> {
    let app = Router::new()
        .route("/", get(console_page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/api/runs", get(console::runs_json))
        .fallback(not_found)
        .with_state(state.clone());
    let addr = format!("{}:{}", opts.host, opts.port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("--host/--port: cannot bind {addr}"))?;
    let local = listener.local_addr()?;
    println!("align serve: listening on http://{local}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(
        "serving {} on http://{local} (context {}, batch {}, queue {}{})",
        state.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", "),
        state.context,
        opts.max_batch,
        opts.max_queue,
        if state.api_key.is_some() { ", API key required" } else { "" }
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    });
    let signal_state = state.clone();
    let timeout = opts.shutdown_timeout;
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_state.shutting_down.store(true, Ordering::SeqCst);
        tracing::info!(
            "shutting down: no new requests; {} running or queued may finish within {:.0}s",
            signal_state.in_flight.load(Ordering::SeqCst),
            timeout.as_secs_f64()
        );
        let _ = stop_tx.send(true);
    });
    let mut stopped = stop_rx.clone();
    tokio::select! {
        r = server => r.context("the HTTP server failed")?,
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(timeout).await;
        } => {
            tracing::warn!("shutdown timeout: cancelling {} unfinished requests", state.in_flight.load(Ordering::SeqCst));
        }
    }
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(key) = &self.api_key else { return Ok(()) };
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) == Some(key.as_str()) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "missing or wrong API key (send 'Authorization: Bearer KEY')",
        ))
    }

    fn resolve(&self, model: &str) -> ApiResult<Option<usize>> {
        match self.models.iter().find(|m| m.id == model) {
            Some(m) => Ok(m.adapter),
            None => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model {model:?} is not served here (served: {})",
                    self.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            }),
        }
    }

    /// New tokens of a request: what it asked for, or what the context leaves.
    fn budget(&self, prompt_tokens: usize, asked: Option<usize>, prompt_field: &str) -> ApiResult<usize> {
        if prompt_tokens >= self.context && asked.unwrap_or(1) > 0 {
            return Err(ApiError::invalid(
                prompt_field,
                format!("'{prompt_field}': {prompt_tokens} tokens, the model's context is {} tokens", self.context),
            ));
        }
        let max_new = asked.unwrap_or(self.context - prompt_tokens.min(self.context));
        check_fits(prompt_tokens, max_new, self.context)
            .map_err(|e| ApiError::invalid("max_tokens", format!("{e}")))?;
        Ok(max_new)
    }

    fn submit(
        &self,
        prompt: Vec<i64>,
        common: &Common,
        max_new: usize,
        logprobs: Option<usize>,
        prompt_logprobs: Option<usize>,
        adapter: Option<usize>,
    ) -> ApiResult<(UnboundedReceiver<Event>, Arc<Vec<AtomicBool>>)> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                "the server is shutting down",
            ));
        }
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                Some("rate_limit_exceeded"),
                format!("the server is at its limit of {} running and queued requests; retry later", self.limit),
            ));
        }
        let slot = Slot(self.in_flight.clone());
        if let Some(&(t, _)) = common.logit_bias.iter().find(|(t, _)| *t >= self.vocab) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("'logit_bias': token id {t} is not below the vocabulary size {}", self.vocab),
            ));
        }
        let (tx, rx) = unbounded_channel();
        let stopped: Arc<Vec<AtomicBool>> = Arc::new((0..common.n).map(|_| AtomicBool::new(false)).collect());
        self.metrics.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::Relaxed);
        let sampling = SamplingConfig {
            max_new_tokens: max_new,
            temperature: common.temperature,
            top_k: common.top_k,
            top_p: common.top_p,
            repetition_penalty: common.repetition_penalty,
        };
        let mut request = EngineRequest::new(0, prompt, sampling, self.eos.clone());
        request.seed = common.seed;
        request.logprobs = logprobs;
        request.prompt_logprobs = prompt_logprobs;
        request.adapter = adapter;
        request.adjustments = LogitAdjustments {
            logit_bias: common.logit_bias.clone(),
            presence_penalty: common.presence_penalty,
            frequency_penalty: common.frequency_penalty,
        };
        let job = Job { request, n: common.n, stopped: stopped.clone(), events: tx, _slot: slot };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.send(job).map_err(|_| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, "the model's worker has stopped")
        })?;
        Ok((rx, stopped))
    }

    fn request_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:06x}", now_secs(), self.next_id.fetch_add(1, Ordering::SeqCst))
    }

    fn encode_prompt(&self, p: &Prompt, at: &str) -> ApiResult<(Vec<i64>, String)> {
        match p {
            Prompt::Text(s) => {
                let ids = self
                    .tokenizer
                    .encode(s, true)
                    .map_err(|e| ApiError::invalid("prompt", format!("'{at}': {e:#}")))?;
                Ok((ids, s.clone()))
            }
            Prompt::Tokens(ids) => {
                if let Some(t) = ids.iter().find(|&&t| t >= self.vocab) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("'{at}': token id {t} is not below the vocabulary size {}", self.vocab),
                    ));
                }
                let text = self
                    .tokenizer
                    .decode(ids, false)
                    .map_err(|e| ApiError::invalid("prompt", format!("'{at}': {e:#}")))?;
                Ok((ids.clone(), text))
            }
        }
    }
}

pub(crate) fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
}

pub(crate) async fn not_found() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        "no such endpoint (see GET /v1/models, POST /v1/chat/completions, POST /v1/completions)",
    )
    .into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "shutting down"}))).into_response();
    }
    axum::Json(json!({
        "status": "ok",
        "running": st.metrics.running.load(Ordering::Relaxed),
        "queued": st.metrics.queue_depth.load(Ordering::Relaxed),
        "in_flight": st.in_flight.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

async fn console_page() -> Html<&'static str> {
    Html(console::PAGE)
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        st.metrics.count_request("models", e.status.as_u16());
        return e.into_response();
    }
    st.metrics.count_request("models", 200);
    let created = now_secs();
    let data: Vec<Value> = st
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "object": "model", "created": created, "owned_by": "align", "root": m.root,
                "parent": m.adapter.map(|_| st.models[0].id.clone()), "max_model_len": st.context,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// A chat log-probability entry of one token.
fn chat_logprob(tok: &ModelTokenizer, lp: &TokenLogprob) -> Value {
    let entry = |id: i64, logprob: f32| {
        let (text, bytes) = token_bytes(tok, id);
        json!({"token": text, "logprob": logprob, "bytes": bytes})
    };
    let mut v = entry(lp.token, lp.logprob);
    v["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, l)| entry(t, l)).collect());
    v
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// What the next event of a job brought.
enum Next {
    Prompt(Vec<TokenLogprob>),
    /// A token of `choice`, already in its text; `delta` is what may be shown now.
    Token {
        choice: usize,
        delta: Delta,
    },
    /// The worker dropped the job (its choices are all finished, or the server is stopping).
    Closed,
    Failed(String),
}

/// One job's events turned into its choices' texts: each token goes into its choice's text (a
/// choice that hits a stop string is marked stopped for the worker), the first one is timed.
struct JobReader {
    rx: UnboundedReceiver<Event>,
    stopped: Arc<Vec<AtomicBool>>,
    texts: Vec<ChoiceText>,
    /// Per choice: the generated token ids shown (eos excluded) and their log-probabilities.
    tokens: Vec<Vec<i64>>,
    lps: Vec<Vec<TokenLogprob>>,
    first: bool,
    started: Instant,
}

impl JobReader {
    fn new(job: (UnboundedReceiver<Event>, Arc<Vec<AtomicBool>>), common: &Common, started: Instant) -> Self {
        let n = common.n;
        JobReader {
            rx: job.0,
            stopped: job.1,
            texts: (0..n).map(|_| ChoiceText::new(common.stop.clone())).collect(),
            tokens: vec![Vec::new(); n],
            lps: vec![Vec::new(); n],
            first: true,
            started,
        }
    }

    fn unfinished(&self) -> bool {
        self.texts.iter().any(|t| t.finish.is_none())
    }

    fn generated(&self) -> usize {
        self.texts.iter().map(|t| t.generated).sum()
    }

    async fn next(&mut self, st: &AppState) -> Next {
        let (choice, step) = match self.rx.recv().await {
            None => return Next::Closed,
            Some(Event::Failed(m)) => return Next::Failed(m),
            Some(Event::Prompt(p)) => return Next::Prompt(p),
            Some(Event::Token { choice, step }) => (choice, step),
        };
        if self.first {
            st.metrics.observe_ttft(self.started.elapsed().as_secs_f64());
            self.first = false;
        }
        let delta = match self.texts[choice].push(&st.tokenizer, &step) {
            Ok(d) => d,
            Err(e) => return Next::Failed(format!("{e:#}")),
        };
        if delta.finish.is_some() && step.finish.is_none() {
            self.stopped[choice].store(true, Ordering::SeqCst);
        }
        if step.finish != Some(align_core::infer::engine::FinishReason::Eos) {
            self.tokens[choice].push(step.token);
        }
        self.lps[choice].extend(delta.logprobs.iter().cloned());
        Next::Token { choice, delta }
    }

    /// Reads until every choice finished (and the prompt's log-probabilities arrived when
    /// `want_prompt`); returns those log-probabilities.
    async fn collect(&mut self, st: &AppState, want_prompt: bool) -> ApiResult<Vec<TokenLogprob>> {
        let mut prompt = None;
        while self.unfinished() || (want_prompt && prompt.is_none()) {
            match self.next(st).await {
                Next::Prompt(p) => prompt = Some(p),
                Next::Token { .. } => {}
                Next::Closed => return Err(internal("the model's worker dropped the request")),
                Next::Failed(m) => return Err(internal(m)),
            }
        }
        Ok(prompt.unwrap_or_default())
    }
}

/// An SSE response of the events a task sends on `out`.
fn sse_response(out: tokio::sync::mpsc::Receiver<SseEvent>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(out);
    let stream = futures_util::StreamExt::map(stream, Ok::<_, std::convert::Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    match chat_response(&st, &headers, &body, started).await {
        Ok(r) => r,
        Err(e) => {
            st.metrics.count_request("chat", e.status.as_u16());
            e.into_response()
        }
    }
}

async fn chat_response(st: &Arc<AppState>, headers: &HeaderMap, body: &[u8], started: Instant) -> ApiResult<Response> {
    st.authorize(headers)?;
    let req = api::chat_request(&api::body_object(body)?)?;
    let adapter = st.resolve(&req.common.model)?;
    let messages: Vec<ChatMessage> = req.messages.iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
    let text = st
        .tokenizer
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid("messages", format!("'messages': the chat template failed: {e:#}")))?;
    // a rendered chat template already holds its special tokens
    let ids = st.tokenizer.encode(&text, false).map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
    let max_new = st.budget(ids.len(), req.common.max_tokens, "messages")?;
    let prompt_tokens = ids.len();
    let common = req.common.clone();
    let mut reader = JobReader::new(st.submit(ids, &common, max_new, req.logprobs, None, adapter)?, &common, started);
    let id = st.request_id("chatcmpl");
    let created = now_secs();
    let n = common.n;
    let logprobs_of = |st: &AppState, lps: &[TokenLogprob]| json!({"content": lps.iter().map(|l| chat_logprob(&st.tokenizer, l)).collect::<Vec<_>>()});
    if common.stream {
        st.metrics.count_request("chat", 200);
        let st = st.clone();
        let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(64);
        tokio::spawn(async move {
            let chunk = |choices: Value| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": common.model,
                       "system_fingerprint": null, "choices": choices})
            };
            for i in 0..n {
                let role = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                if tx.send(data(&chunk(role))).await.is_err() {
                    return;
                }
            }
            while reader.unfinished() {
                let (choice, delta) = match reader.next(&st).await {
                    Next::Token { choice, delta } => (choice, delta),
                    Next::Prompt(_) => continue,
                    Next::Closed => break,
                    Next::Failed(m) => {
                        let _ = tx.send(data(&internal(m).body())).await;
                        break;
                    }
                };
                let logprobs = match req.logprobs {
                    Some(_) if !delta.logprobs.is_empty() => logprobs_of(&st, &delta.logprobs),
                    _ => Value::Null,
                };
                if !delta.text.is_empty() || !logprobs.is_null() {
                    let c = json!([{"index": choice, "delta": {"content": delta.text}, "logprobs": logprobs, "finish_reason": null}]);
                    if tx.send(data(&chunk(c))).await.is_err() {
                        return;
                    }
                }
                if let Some(f) = delta.finish {
                    let c = json!([{"index": choice, "delta": {}, "logprobs": null, "finish_reason": f}]);
                    if tx.send(data(&chunk(c))).await.is_err() {
                        return;
                    }
                }
            }
            if common.include_usage {
                let mut last = chunk(json!([]));
                last["usage"] = usage(prompt_tokens, reader.generated());
                let _ = tx.send(data(&last)).await;
            }
            st.metrics.observe_latency(started.elapsed().as_secs_f64());
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        });
        return Ok(sse_response(out));
    }
    reader.collect(st, false).await?;
    let choices: Vec<Value> = reader
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let logprobs = req.logprobs.map(|_| logprobs_of(st, &reader.lps[i]));
            json!({"index": i, "message": {"role": "assistant", "content": t.text()}, "logprobs": logprobs, "finish_reason": t.finish})
        })
        .collect();
    st.metrics.count_request("chat", 200);
    st.metrics.observe_latency(started.elapsed().as_secs_f64());
    Ok(axum::Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": common.model,
        "system_fingerprint": null, "choices": choices, "usage": usage(prompt_tokens, reader.generated()),
    }))
    .into_response())
}

/// The completions `logprobs` object of `tokens` (None entries: the first prompt token).
fn completion_logprobs(tok: &ModelTokenizer, entries: &[(i64, Option<&TokenLogprob>)]) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut offset = 0;
    for (id, lp) in entries {
        let (text, _) = token_bytes(tok, *id);
        text_offset.push(offset);
        offset += text.chars().count();
        tokens.push(Value::String(text));
        match lp {
            Some(lp) => {
                token_logprobs.push(json!(lp.logprob));
                let mut top = serde_json::Map::new();
                for &(t, l) in &lp.top {
                    top.entry(token_bytes(tok, t).0).or_insert(json!(l));
                }
                top_logprobs.push(Value::Object(top));
            }
            None => {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    match completion_response(&st, &headers, &body, started).await {
        Ok(r) => r,
        Err(e) => {
            st.metrics.count_request("completions", e.status.as_u16());
            e.into_response()
        }
    }
}

/// One prompt of a completion request: its tokens, its text and the reader of its choices.
struct PromptJob {
    ids: Vec<i64>,
    text: String,
    reader: JobReader,
}

async fn completion_response(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> ApiResult<Response> {
    st.authorize(headers)?;
    let req = api::completion_request(&api::body_object(body)?)?;
    let adapter = st.resolve(&req.common.model)?;
    let n = req.common.n;
    let mut encoded = Vec::with_capacity(req.prompts.len());
    for (i, p) in req.prompts.iter().enumerate() {
        let at = if req.prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{i}]") };
        let (ids, text) = st.encode_prompt(p, &at)?;
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", format!("'{at}': encodes to no tokens")));
        }
        let max_new = st.budget(ids.len(), req.common.max_tokens, "prompt")?;
        encoded.push((ids, text, max_new));
    }
    let prompt_lp = (req.echo && req.logprobs.is_some()).then(|| req.logprobs.unwrap_or(0));
    let mut jobs = Vec::with_capacity(encoded.len());
    for (ids, text, max_new) in encoded {
        let job = st.submit(ids.clone(), &req.common, max_new, req.logprobs, prompt_lp, adapter)?;
        let mut reader = JobReader::new(job, &req.common, started);
        if max_new == 0 {
            // echo only: the choices are finished before they start
            for t in reader.texts.iter_mut() {
                t.finish = Some("length");
            }
        }
        jobs.push(PromptJob { ids, text, reader });
    }
    let id = st.request_id("cmpl");
    let created = now_secs();
    let model = req.common.model.clone();
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices})
    };
    if req.common.stream {
        st.metrics.count_request("completions", 200);
        let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(64);
        let total_prompt: usize = jobs.iter().map(|j| j.ids.len()).sum();
        let (include_usage, echo) = (req.common.include_usage, req.echo);
        let mut handles = Vec::new();
        for (p, mut job) in jobs.into_iter().enumerate() {
            let (tx, st, chunk) = (tx.clone(), st.clone(), chunk.clone());
            handles.push(tokio::spawn(async move {
                let piece = |index: usize, text: &str, finish: Option<&str>| {
                    chunk(json!([{"index": index, "text": text, "logprobs": null, "finish_reason": finish}]))
                };
                if echo {
                    for i in 0..n {
                        let _ = tx.send(data(&piece(p * n + i, &job.text, None))).await;
                    }
                }
                while job.reader.unfinished() {
                    match job.reader.next(&st).await {
                        Next::Token { choice, delta } => {
                            if (!delta.text.is_empty() || delta.finish.is_some())
                                && tx.send(data(&piece(p * n + choice, &delta.text, delta.finish))).await.is_err()
                            {
                                break;
                            }
                        }
                        Next::Prompt(_) => {}
                        Next::Closed => break,
                        Next::Failed(m) => {
                            let _ = tx.send(data(&internal(m).body())).await;
                            break;
                        }
                    }
                }
                job.reader.generated()
            }));
        }
        let st = st.clone();
        tokio::spawn(async move {
            let mut generated = 0;
            for h in handles {
                generated += h.await.unwrap_or(0);
            }
            if include_usage {
                let mut last = chunk(json!([]));
                last["usage"] = usage(total_prompt, generated);
                let _ = tx.send(data(&last)).await;
            }
            st.metrics.observe_latency(started.elapsed().as_secs_f64());
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        });
        return Ok(sse_response(out));
    }
    let want_prompt = prompt_lp.is_some();
    let results = futures_util::future::join_all(jobs.into_iter().map(|mut job| async move {
        let prompt = job.reader.collect(st, want_prompt).await?;
        Ok::<_, ApiError>((job, prompt))
    }))
    .await;
    let mut choices = Vec::new();
    let (mut prompt_total, mut generated) = (0, 0);
    for (p, r) in results.into_iter().enumerate() {
        let (job, prompt_logprobs) = r?;
        prompt_total += job.ids.len();
        generated += job.reader.generated();
        for (i, t) in job.reader.texts.iter().enumerate() {
            let text = if req.echo { format!("{}{}", job.text, t.text()) } else { t.text().to_string() };
            let logprobs = req.logprobs.map(|_| {
                let mut entries: Vec<(i64, Option<&TokenLogprob>)> = Vec::new();
                if req.echo {
                    entries.push((job.ids[0], None));
                    entries.extend(job.ids[1..].iter().zip(&prompt_logprobs).map(|(&t, lp)| (t, Some(lp))));
                }
                entries.extend(job.reader.tokens[i].iter().zip(&job.reader.lps[i]).map(|(&t, lp)| (t, Some(lp))));
                completion_logprobs(&st.tokenizer, &entries)
            });
            choices.push(json!({"index": p * n + i, "text": text, "logprobs": logprobs, "finish_reason": t.finish}));
        }
    }
    st.metrics.count_request("completions", 200);
    st.metrics.observe_latency(started.elapsed().as_secs_f64());
    let mut body = chunk(Value::Array(choices));
    body["usage"] = usage(prompt_total, generated);
    Ok(axum::Json(body).into_response())
}
