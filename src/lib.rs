//! tidemark — a supervised, actor-based runtime for real-time sensor analytics.
//!
//! Module map:
//!
//! | module          | owns                                                                  |
//! |-----------------|-----------------------------------------------------------------------|
//! | [`auth`]        | API keys and scopes                                                   |
//! | [`config`]      | configuration layers, validation listing every error, redaction       |
//! | [`messages`]    | events, window results, dead letters, checkpoints, actor messages     |
//! | [`ingest`]      | parsing and validating request bodies (JSON, arrays, NDJSON)          |
//! | [`routing`]     | sensor → partition (Kafka's murmur2 partitioner)                      |
//! | [`router`]      | embedded ingest log: positions, replay buffers, routing table          |
//! | [`kafka`]       | librdkafka settings of the consumer and producers                     |
//! | [`keys`]        | a partition's key table, laid out for memory                          |
//! | [`window`]      | event-time windows (tumbling, hopping, session), watermarks (pure)    |
//! | [`rules`]       | alert rules: firing and resolved alerts per key (pure)               |
//! | [`scoring`]     | detectors (context, ewma, rcf), likelihood post-processing (pure)     |
//! | [`search`]      | `/api/search` query syntax and the search backends                    |
//! | [`elasticsearch`] | the Elasticsearch client: bulk documents, template, search          |
//! | [`score_csv`]   | `tidemark score-csv`: CSV series through a scorer (NAB layout)        |
//! | [`store`]       | the `Store` trait and its SQLite implementation                       |
//! | [`actors`]      | partition actors, sinks, the HTTP gateway                             |
//! | [`supervision`] | supervisors, restart policy and budget, backoff                       |
//! | [`runtime`]     | assembling an instance, graceful shutdown                             |
//! | [`replay`]      | `tidemark replay`: a file through the pipeline, as fast as it goes    |
//! | [`metrics`]     | Prometheus metrics of one instance                                    |
//! | [`sim`]         | deterministic sensor simulator and load generator                     |
//! | [`telemetry`]   | logging setup                                                         |
//!
//! Data flow: gateway → router (assigns positions, logs for replay) → partition actor
//! (windows, scoring) → store sink (batched idempotent upserts + checkpoints) → store →
//! query API. See `docs/architecture.md`.

pub mod actors;
pub mod auth;
pub mod config;
pub mod doctor;
pub mod elasticsearch;
pub mod ingest;
pub mod kafka;
pub mod keys;
pub mod live;
pub mod messages;
pub mod metrics;
pub mod mqtt;
pub mod ratelimit;
pub mod replay;
pub mod router;
pub mod routing;
pub mod rules;
pub mod runtime;
pub mod score_csv;
pub mod scoring;
pub mod search;
pub mod sim;
pub mod store;
pub mod supervision;
pub mod telemetry;
pub mod tls;
pub mod window;
