//! The gateway actor: serves the REST API, `/metrics`, `/health` and `/ready` with axum.
//!
//! The actor owns the server task: it binds in `pre_start` (so a taken port fails the
//! start, visibly), fails if the server stops on its own (so its supervisor restarts
//! it on the same address), and shuts the server down gracefully when stopped.

mod dashboard;
mod error;
mod ingest;
mod ops;
pub mod params;
pub mod query;
pub mod serve;
mod ws;

pub use error::ApiError;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actors::sinks::Sinks;
use crate::config::Config;
use crate::ingest::ParseLimits;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};
use crate::router::PartitionRouter;
use crate::store::Store;

/// What request handlers share.
pub struct AppContext {
    pub config: Arc<Config>,
    pub router: Arc<PartitionRouter>,
    pub store: Arc<dyn Store>,
    pub sinks: Arc<Sinks>,
    pub metrics: Arc<Metrics>,
    pub limits: ParseLimits,
    pub started_at: Instant,
    /// Where accepted events go: the embedded router, or the Kafka topic.
    pub ingest: Arc<dyn crate::ingest::Ingest>,
    /// Sources with a status of their own (Kafka: assigned partitions, lag).
    pub sources: Vec<Arc<dyn crate::ingest::SourceStatus>>,
    /// What answers `/api/search`: Elasticsearch when configured, else the store.
    pub search: Arc<dyn crate::search::SearchBackend>,
    /// The API keys accepted (none: authentication off).
    pub keys: Arc<crate::auth::KeyRing>,
    /// Per-client request rate limit (`None`: off).
    pub rate_limiter: Option<crate::ratelimit::ClientLimiter>,
    /// HTTPS (`None`: plain HTTP).
    pub tls: Option<Arc<crate::tls::GatewayTls>>,
    /// Samples repeated rejections per client (`None`: every one is stored).
    pub dead_letter_sampler: Option<Arc<crate::ingest::sampling::DeadLetterSampler>>,
    /// The alert rules in force (a reload replaces them).
    pub rules: Arc<crate::rules::RulesHandle>,
}

impl AppContext {
    /// Partitions this instance serves: the ones its sources own, or all of them.
    pub fn owned_partitions(&self) -> Vec<crate::messages::PartitionId> {
        self.sources
            .iter()
            .find_map(|source| source.owned_partitions())
            .unwrap_or_else(|| (0..self.router.partitions()).collect())
    }
}

/// The HTTP API.
pub fn routes(app: Arc<AppContext>) -> Router {
    let body_limit = app.config.http.max_body_bytes;
    Router::new()
        .route("/api/events", post(ingest::post_events))
        .route("/api/predictions", get(query::predictions))
        .route("/api/alerts", get(query::alerts))
        .route("/api/rules", get(query::rules))
        .route("/api/sensors/top", get(query::top_sensors))
        .route("/api/sensors/skew", get(query::skewed_sensors))
        .route("/api/summary", get(query::summary))
        .route("/api/search", get(query::search))
        .route("/api/search/histogram", get(query::histogram))
        .route("/api/dead-letters", get(query::dead_letters))
        .route("/api/status", get(ops::status))
        .route("/api/openapi.json", get(ops::openapi))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/ws", get(ws::upgrade))
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::style))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(app.config.http.body_read_timeout))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), rate_limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), authorize))
        .layer(cors(&app.config.http.cors_allowed_origins))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), track_requests))
        .with_state(app)
}

/// CORS for the configured origins only; none configured: no CORS header at all (a
/// preflight gets no permission, so other origins cannot send JSON or read answers).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderName::from_static("x-api-key"),
        ])
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|origin| origin == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        let list: Vec<axum::http::HeaderValue> =
            origins.iter().filter_map(|origin| axum::http::HeaderValue::from_str(origin).ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", request.method(), request.uri().path()),
    )
}

/// Check the request's API key against the scope its endpoint needs.
async fn authorize(State(app): State<Arc<AppContext>>, request: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let Some(scope) = crate::auth::required_scope(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let mut presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .or_else(|| headers.get("x-api-key").and_then(|value| value.to_str().ok()))
        .map(|key| key.trim().to_string());
    let websocket = request.uri().path() == "/ws";
    if websocket && presented.is_none() {
        // Browsers cannot set headers on a WebSocket: the key may come as a parameter.
        presented = ws::access_token(request.uri().query());
    }
    match app.keys.authorize(presented.as_deref(), scope) {
        Ok(name) => {
            let client = name.map(crate::ratelimit::ClientId::Key);
            let mut request = request;
            if websocket {
                let admin = app.keys.authorize(presented.as_deref(), crate::auth::Scope::Admin).is_ok();
                request.extensions_mut().insert(ws::Grant { admin });
            }
            if let Some(client) = client {
                request.extensions_mut().insert(client);
            }
            next.run(request).await
        }
        Err(error @ crate::auth::AuthError::Forbidden { .. }) => {
            ApiError::new(axum::http::StatusCode::FORBIDDEN, "forbidden", error.to_string()).into_response()
        }
        Err(error) => {
            let mut response =
                ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unauthorized", error.to_string()).into_response();
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Name the client of each request (its API key, else its IP address) for the handlers,
/// and hold it to `http.rate_limit_per_second`.
async fn rate_limit(State(app): State<Arc<AppContext>>, mut request: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let client = match request.extensions().get::<crate::ratelimit::ClientId>() {
        Some(client) => client.clone(),
        None => match request.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>() {
            Some(info) => {
                let client = crate::ratelimit::ClientId::Ip(info.0.ip());
                request.extensions_mut().insert(client.clone());
                client
            }
            None => return next.run(request).await,
        },
    };
    let Some(limiter) = &app.rate_limiter else {
        return next.run(request).await;
    };
    if matches!(request.uri().path(), "/health" | "/ready") {
        return next.run(request).await;
    }
    match limiter.check(&client) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let mut error = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "{client} sent more than {} requests per second (http.rate_limit_per_second); retry after {} ms",
                    limiter.per_second(),
                    wait.as_millis().max(1)
                ),
            );
            error.retry_after_secs = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
            error.into_response()
        }
    }
}

/// Count requests and their duration per route (the matched pattern, never the raw path).
async fn track_requests(State(app): State<Arc<AppContext>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    app.metrics.http_requests.get_or_create(&HttpLabels { method, route: route.clone(), status }).inc();
    app.metrics.http_request_seconds.get_or_create(&RouteLabels { route }).observe(started.elapsed().as_secs_f64());
    response
}

pub struct GatewayActor;

pub struct GatewayArgs {
    pub app: Arc<AppContext>,
    pub addr: SocketAddr,
    /// A listener bound by the caller (first start); restarts bind `addr` again.
    pub listener: Option<tokio::net::TcpListener>,
}

pub enum GatewayMsg {
    /// The server task ended without being asked to.
    ServerExited(String),
}

pub struct GatewayState {
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    /// Publishes the status to `/ws` subscribers.
    status_feed: JoinHandle<()>,
    live: Arc<crate::live::LiveHub>,
}

/// Hand the status to the live feed every `ws.status_interval` while anyone subscribes.
fn spawn_status_feed(app: Arc<AppContext>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(app.config.ws.status_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let live = app.sinks.live();
            if live.wants(crate::live::Kind::Status) {
                live.publish_status(ops::status_body(&app));
            }
        }
    })
}

/// Run the server on a runtime of its own (`http.worker_threads` threads), so request
/// handling never waits behind the partitions' scoring and checkpoint serialisation on
/// the main runtime. The listener moves over; the handle resolves when the server ends.
fn own_runtime(
    workers: usize,
    serving: impl std::future::Future<Output = std::io::Result<()>> + Send + 'static,
) -> Result<JoinHandle<std::io::Result<()>>, ActorProcessingErr> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("tidemark-http")
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the HTTP runtime: {error}"))?;
    let (done, outcome) = oneshot::channel();
    std::thread::Builder::new()
        .name("tidemark-http".into())
        .spawn(move || {
            let _ = done.send(runtime.block_on(serving));
            // Connections still draining are dropped with the runtime.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(|error| format!("cannot start the HTTP thread: {error}"))?;
    Ok(tokio::spawn(async move { outcome.await.unwrap_or_else(|_| Err(std::io::Error::other("HTTP runtime ended"))) }))
}

impl Drop for GatewayState {
    /// A killed actor skips `post_stop`; its server must not outlive it.
    fn drop(&mut self) {
        self.status_feed.abort();
        self.live.close_all();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GatewayMsg>,
        args: GatewayArgs,
    ) -> Result<GatewayState, ActorProcessingErr> {
        let listener = match args.listener {
            Some(listener) => listener,
            None => tokio::net::TcpListener::bind(args.addr)
                .await
                .map_err(|error| format!("cannot listen on {}: {error}", args.addr))?,
        };
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let limits = serve::ServeLimits {
            header_read_timeout: args.app.config.http.header_read_timeout,
            max_connections: args.app.config.http.max_connections,
            drain_timeout: args.app.config.shutdown.timeout,
            tls_reload_interval: args.app.config.http.tls_reload_interval,
        };
        let tls = args.app.tls.clone();
        let workers = args.app.config.http.worker_threads;
        let live = Arc::clone(args.app.sinks.live());
        let status_feed = spawn_status_feed(Arc::clone(&args.app));
        let app = routes(args.app);
        let serving = async move {
            serve::serve(listener, app, limits, tls, async move {
                let _ = shutdown_signal.await;
            })
            .await
        };
        let outcome = if workers == 0 { tokio::spawn(serving) } else { own_runtime(workers, serving)? };
        let server = tokio::spawn(async move {
            let reason = match outcome.await {
                Ok(Ok(())) => "server stopped".to_string(),
                Ok(Err(error)) => format!("server failed: {error}"),
                Err(error) => format!("server task ended: {error}"),
            };
            // Only reaches a live actor if nobody asked the server to stop.
            let _ = myself.send_message(GatewayMsg::ServerExited(reason));
        });
        Ok(GatewayState { shutdown: Some(shutdown), server: Some(server), status_feed, live })
    }

    async fn handle(
        &self,
        _myself: ActorRef<GatewayMsg>,
        message: GatewayMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GatewayMsg::ServerExited(reason) => {
                if state.shutdown.is_some() {
                    return Err(reason.into());
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<GatewayMsg>,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        // WebSocket clients are told to reconnect (to this instance once restarted).
        state.live.close_all();
        if let Some(shutdown) = state.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = state.server.take() {
            // Open connections get a moment to finish; the rest are dropped.
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        Ok(())
    }
}
