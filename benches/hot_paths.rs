//! criterion benches of the hot pieces: parsing, routing, window update, scoring, store
//! batch writes. `cargo bench --bench hot_paths`; figures in docs/benchmarks.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tidemark::config::{Config, ConfigSources};
use tidemark::ingest::{BodyFormat, ParseLimits, parse_body};
use tidemark::messages::{Severity, WindowResult};
use tidemark::routing::partition_for;
use tidemark::scoring::Scorer;
use tidemark::sim::{Generator, SimConfig};
use tidemark::store::WriteBatch;
use tidemark::window::{KeyWindows, WindowKind, WindowSpec, Windows};

fn ndjson(events: usize) -> String {
    let config = SimConfig {
        sensors: 1000,
        rate: 10_000.0,
        duration: Some(Duration::from_millis(events as u64 / 10)),
        anomalies: 0,
        ..SimConfig::default()
    };
    let mut out = String::new();
    for event in Generator::new(config) {
        event.write_json(&mut out);
    }
    out
}

fn parsing(c: &mut Criterion) {
    let body = ndjson(10_000);
    let lines = body.lines().count() as u64;
    let array = format!("[{}]", body.lines().collect::<Vec<_>>().join(","));
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(lines));
    group.bench_function("ndjson_10k_events", |b| {
        b.iter(|| parse_body(black_box(body.as_bytes()), BodyFormat::Ndjson, ParseLimits::default(), 0))
    });
    group.bench_function("json_array_10k_events", |b| {
        b.iter(|| parse_body(black_box(array.as_bytes()), BodyFormat::Json, ParseLimits::default(), 0))
    });
    group.finish();
}

/// What the MQTT source does per message: topic → fields, payload → event, identity,
/// redelivery check against the last 65,536 events.
fn mqtt_messages(c: &mut Criterion) {
    let topics = tidemark::mqtt::Topics::parse(&["sensors/{sensorId}/data".to_string()]).expect("pattern");
    let messages: Vec<(String, String)> = (0..10_000)
        .map(|i| {
            (
                format!("sensors/sensor-{:04}/data", i % 1000),
                format!(
                    r#"{{"eventType":"temperature","value":{}.25,"timestamp":{}}}"#,
                    i % 97,
                    1_767_225_600_000i64 + i
                ),
            )
        })
        .collect();
    let mut group = c.benchmark_group("mqtt");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("decode_and_dedup_10k_messages", |b| {
        b.iter(|| {
            // A fresh memory each round, so every message takes the insert path.
            let mut recent = tidemark::mqtt::RecentEvents::new(65_536);
            let mut taken = 0usize;
            for (topic, payload) in &messages {
                if let Ok(event) = tidemark::mqtt::decode(&topics, topic, payload.as_bytes(), ParseLimits::default(), 0)
                {
                    let id = tidemark::mqtt::identity(&event);
                    if !recent.contains(id) {
                        recent.insert(id);
                        taken += 1;
                    }
                }
            }
            black_box(taken)
        })
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let ids: Vec<String> = (0..1000).map(|i| format!("sensor-{i:04}")).collect();
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("murmur2_partition_1k_ids", |b| {
        b.iter(|| ids.iter().map(|id| partition_for(black_box(id), 8)).sum::<u32>())
    });
    group.finish();
}

fn windows(c: &mut Criterion) {
    let spec = WindowSpec {
        kind: WindowKind::Tumbling,
        size_ms: 30_000,
        slide_ms: 30_000,
        out_of_orderness_ms: 5_000,
        allowed_lateness_ms: 0,
        idle_timeout_ms: 60_000,
    };
    let mut group = c.benchmark_group("window");
    group.throughput(Throughput::Elements(1));
    group.bench_function("add_in_order", |b| {
        let mut key = KeyWindows::default();
        let mut fired = Vec::new();
        let mut t = 0i64;
        b.iter(|| {
            t += 100;
            let _ = key.add(&spec, black_box(t), 21.5, t, &mut fired);
            fired.clear();
        })
    });
    group.bench_function("add_out_of_order", |b| {
        let mut key = KeyWindows::default();
        let mut fired = Vec::new();
        let mut t = 0i64;
        b.iter(|| {
            t += 100;
            let jitter = (t * 7919) % 4000;
            let _ = key.add(&spec, black_box(t - jitter), 21.5, t, &mut fired);
            fired.clear();
        })
    });
    group.finish();
}

/// Cost per event of each window kind on 10,000 keys, each sending one event a second
/// (round robin, so every key's state is cold in cache as in a partition): window
/// update and firing alone, then with the default scorer scoring every fired window.
/// A hopping 10 m / 10 s window fires as often as a 10 s tumbling one and covers as much
/// as a 10 m tumbling one; both are shown.
fn window_kinds(c: &mut Criterion) {
    const KEYS: usize = 10_000;
    let base = WindowSpec::from_config(&Config::embedded().expect("defaults").pipeline);
    let kinds = [
        ("tumbling_10m", base.tumbling(600_000)),
        ("tumbling_10s", base.tumbling(10_000)),
        ("hopping_10m_10s", base.hopping(600_000, 10_000)),
        ("session_gap_30s", base.session(30_000)),
    ];
    let config = Config::embedded().expect("defaults");
    let scorer = Scorer::from_name(&config.scoring.model, &config.scoring).expect("default model");
    // Keys visited in memory order (the prefetcher streams a small state in) and in a
    // scattered order, as a partition's hash map visits them.
    for (group_name, stride) in
        [("window_kind_per_event_10k_keys", 1usize), ("window_kind_per_event_10k_keys_scattered", 7_919)]
    {
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(1));
        for scored in [false, true] {
            if scored && stride != 1 {
                continue;
            }
            for (name, spec) in kinds {
                let name = if scored { format!("{name}_scored") } else { name.to_string() };
                group.bench_function(name, |b| {
                    let mut keys: Vec<(Windows, tidemark::scoring::ScorerState)> =
                        (0..KEYS).map(|_| (Windows::new(&spec, None), scorer.new_state())).collect();
                    let mut fired = Vec::new();
                    let mut i = 0usize;
                    // Start past the first hour, so every kind runs in its steady state.
                    let mut t = 3_600_000i64;
                    // Fill the windows before measuring (an hour of events would be 36 M).
                    for _ in 0..KEYS * 700 {
                        let (windows, _) = &mut keys[i * stride % KEYS];
                        let _ = windows.add(&spec, t, 21.5 + (i % 7) as f64, t, &mut fired);
                        fired.clear();
                        i += 1;
                        if i == KEYS {
                            i = 0;
                            t += 1_000;
                        }
                    }
                    b.iter(|| {
                        let (windows, state) = &mut keys[i * stride % KEYS];
                        let value = 21.5 + ((t / 1_000) % 13) as f64 * 0.1;
                        let _ = windows.add(&spec, black_box(t), value, t, &mut fired);
                        if scored {
                            for window in fired.drain(..) {
                                black_box(scorer.score(state, &window.features));
                            }
                        } else {
                            black_box(fired.len());
                            fired.clear();
                        }
                        i += 1;
                        if i == KEYS {
                            i = 0;
                            t += 1_000;
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

/// Time per window of each scorer (detector + post-processing) on a realistic stream
/// (a daily cycle with noise, 30 s windows), and the state bytes per key it holds after
/// 10,000 windows (postcard, as checkpoints store it), printed before the timings.
fn scoring(c: &mut Criterion) {
    let config = Config::embedded().expect("defaults");
    let window = |i: u64| {
        let start_ms = i as i64 * 30_000;
        let day = (start_ms % 86_400_000) as f64 / 86_400_000.0;
        let mean = 20.0 + 5.0 * (day * std::f64::consts::TAU).sin() + ((i * 7919) % 13) as f64 * 0.05;
        tidemark::window::WindowFeatures {
            start_ms,
            end_ms: start_ms + 30_000,
            count: 300,
            mean,
            min: mean - 1.0,
            max: mean + 1.0,
            stddev: 0.4 + (i % 5) as f64 * 0.01,
        }
    };
    let mut group = c.benchmark_group("score");
    group.throughput(Throughput::Elements(1));
    for model in tidemark::scoring::MODELS {
        let scorer = Scorer::from_name(model, &config.scoring).expect("model");
        let mut state = scorer.new_state();
        for i in 0..10_000 {
            scorer.score(&mut state, &window(i));
        }
        let bytes = postcard::to_allocvec(&state).map(|b| b.len()).unwrap_or(0);
        eprintln!("score/{model}: {bytes} state bytes per key after 10,000 windows");
        let mut i = 10_000u64;
        group.bench_function(format!("{model}_per_window"), |b| {
            b.iter(|| {
                i += 1;
                black_box(scorer.score(&mut state, black_box(&window(i))))
            })
        });
    }
    group.finish();
}

fn result(i: usize, window: i64) -> WindowResult {
    WindowResult {
        sensor_id: format!("sensor-{i:05}").into(),
        event_type: "temperature".into(),
        window_kind: tidemark::window::WindowKind::Tumbling,
        window_start_ms: window,
        window_end_ms: window + 30_000,
        event_count: 300,
        avg_value: 21.5,
        min_value: 20.0,
        max_value: 23.0,
        stddev: 0.5,
        prediction_score: 0.1,
        anomaly: false,
        severity: Severity::Low,
        revision: 0,
        explanation: "mean 0.3σ above baseline 21.4 (σ 0.1)".into(),
        fired_at_ms: 0,
        supersedes: Vec::new(),
    }
}

fn store_writes(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let config = Config::load(&ConfigSources::default().with("store.url", url)).expect("config");
    let store = runtime.block_on(tidemark::store::open(&config.store)).expect("store");
    let mut group = c.benchmark_group("store_upsert_sqlite");
    for rows in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(rows as u64));
        let mut window = 0i64;
        group.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, &rows| {
            b.to_async(&runtime).iter(|| {
                window += 30_000;
                let results: Vec<WindowResult> = (0..rows).map(|i| result(i, window)).collect();
                let store = &store;
                async move {
                    store.write(&WriteBatch { results: &results, ..WriteBatch::default() }).await.expect("write");
                }
            })
        });
    }
    group.finish();
}

/// Needs a server: `TIDEMARK_BENCH_DATABASE_URL` (or `TIDEMARK_TEST_DATABASE_URL`, which
/// scripts/test.sh starts) naming a role that may create databases. Each run writes into a
/// new, empty database (`tidemark_bench_<time>`) and drops it afterwards.
fn postgres_writes(c: &mut Criterion) {
    use sqlx::Connection;
    use tidemark::store::{PostgresStore, WriteMethod};
    let Some(server) =
        std::env::var("TIDEMARK_BENCH_DATABASE_URL").or_else(|_| std::env::var("TIDEMARK_TEST_DATABASE_URL")).ok()
    else {
        eprintln!("store_upsert_postgres: not run; set TIDEMARK_BENCH_DATABASE_URL to a PostgreSQL server");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let name = format!("tidemark_bench_{}", chrono::Utc::now().timestamp_millis());
    let admin_sql = |statement: String| {
        let server = server.clone();
        runtime.block_on(async move {
            let mut admin = sqlx::PgConnection::connect(&server).await.expect("connect to the bench server");
            sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await.expect("admin statement");
        })
    };
    admin_sql(format!("CREATE DATABASE {name}"));
    let base = server.split('?').next().unwrap_or(&server);
    let url = format!("{}/{name}", &base[..base.rfind('/').unwrap_or(base.len())]);
    let config = Config::load(&ConfigSources::default().with("store.url", url)).expect("config");
    for (name, method) in [("unnest", WriteMethod::Unnest), ("copy", WriteMethod::Copy)] {
        let store = runtime.block_on(PostgresStore::open_with(&config.store, method)).expect("postgres");
        let mut group = c.benchmark_group(format!("store_upsert_postgres_{name}"));
        let mut window = rand_start();
        for rows in [1usize, 100, 1000] {
            group.throughput(Throughput::Elements(rows as u64));
            group.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, &rows| {
                b.to_async(&runtime).iter(|| {
                    window += 30_000;
                    let results: Vec<WindowResult> = (0..rows).map(|i| result(i, window)).collect();
                    let store = &store;
                    async move {
                        use tidemark::store::Store;
                        store.write(&WriteBatch { results: &results, ..WriteBatch::default() }).await.expect("write");
                    }
                })
            });
        }
        group.finish();
        runtime.block_on(async { tidemark::store::Store::close(&store).await });
    }
    admin_sql(format!("DROP DATABASE {name}"));
}

/// Window results bulk-encoded and indexed into the Elasticsearch stand-in (in this
/// process, over loopback HTTP, through the `elasticsearch` client): encoding alone, and
/// encode + `_bulk` + reading the answer item by item.
fn elasticsearch_bulk(c: &mut Criterion) {
    use tidemark::elasticsearch::{EsClient, encode_bulk};
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let double = runtime
        .block_on(tidemark::sim::es_double::EsDouble::start("127.0.0.1:0".parse().expect("addr")))
        .expect("stand-in");
    let config = Config::load(
        &ConfigSources::default()
            .with("elasticsearch.enabled", true)
            .with("elasticsearch.urls", vec![double.url()])
            .with("elasticsearch.index", "tidemark-predictions-%Y.%m.%d"),
    )
    .expect("config");
    let client = EsClient::new(&config.elasticsearch).expect("client");
    runtime.block_on(client.apply_template()).expect("template");
    let docs = 5000usize;
    let results: Vec<WindowResult> =
        (0..docs).map(|i| result(i, 1_767_225_600_000 + (i as i64 % 10) * 60_000)).collect();
    let refs: Vec<&WindowResult> = results.iter().collect();
    let mut group = c.benchmark_group("elasticsearch_bulk");
    group.throughput(Throughput::Elements(docs as u64));
    group
        .bench_function("encode_5000", |b| b.iter(|| black_box(encode_bulk(&client.index, &refs, 0).expect("encode"))));
    group.bench_function("encode_send_5000", |b| {
        b.to_async(&runtime).iter(|| {
            let body = encode_bulk(&client.index, &refs, 0).expect("encode");
            let client = &client;
            async move {
                let outcomes = client.bulk(body).await.expect("bulk");
                assert_eq!(outcomes.len(), 5000);
            }
        })
    });
    group.finish();
}

/// A window origin after earlier runs' first windows, so iterations insert new rows.
fn rand_start() -> i64 {
    let now = chrono::Utc::now().timestamp_millis();
    now - now % 30_000
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = parsing, mqtt_messages, routing, windows, window_kinds, scoring, store_writes, postgres_writes, elasticsearch_bulk
}
criterion_main!(benches);
