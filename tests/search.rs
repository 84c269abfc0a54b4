//! `/api/search` and `/api/search/histogram`: the same API suite on every backend —
//! the embedded SQLite store (FTS5), PostgreSQL (full text) and Elasticsearch (the
//! protocol-level stand-in in `tidemark::sim::es_double`, through the real client).
//!
//! Expected answers are computed from `/api/predictions` with the query language's
//! reference semantics (`TextQuery::matches`), so every backend is held to the same rule.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Backend, Client, eventually, post_batches, sources_on, workload};
use serde_json::Value;
use tidemark::search::{TextQuery, searchable_text};
use tidemark::sim::SimConfig;
use tidemark::sim::es_double::EsDouble;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SearchOn {
    Sqlite,
    Postgres,
    Elasticsearch,
}

/// What a case's filters keep, by the reference rule.
type RowFilter = Box<dyn Fn(&Value) -> bool>;

fn key(row: &Value) -> String {
    format!("{}|{}|{}", row["sensorId"], row["eventType"], row["windowStart"])
}

fn expected(rows: &[Value], q: &str, filter: impl Fn(&Value) -> bool) -> Vec<String> {
    let query = TextQuery::parse(q).expect("valid query").expect("non-empty query");
    let mut keys: Vec<String> = rows
        .iter()
        .filter(|row| {
            let text = searchable_text(
                row["sensorId"].as_str().unwrap_or_default(),
                row["eventType"].as_str().unwrap_or_default(),
                row["severity"].as_str().unwrap_or_default(),
                row["explanation"].as_str().unwrap_or_default(),
            );
            query.matches(&text) && filter(row)
        })
        .map(key)
        .collect();
    keys.sort();
    keys
}

/// Every page of a search, checking the order (newest window first) on the way.
async fn search_all(client: &Client, query: &str, page_size: u32) -> Vec<Value> {
    let mut rows: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/search?{query}&limit={page_size}&cursor={cursor}"),
            None => format!("/api/search?{query}&limit={page_size}"),
        };
        let page = client.get_ok(&path).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= page_size as usize);
        rows.extend(items);
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
        assert!(rows.len() < 100_000, "pagination does not end");
    }
    for pair in rows.windows(2) {
        let (a, b) = (pair[0]["windowStart"].as_str().unwrap_or(""), pair[1]["windowStart"].as_str().unwrap_or(""));
        assert!(a >= b, "{query}: not newest first: {a} before {b}");
    }
    rows
}

fn encode(q: &str) -> String {
    serde_urlencoded::to_string([("q", q)]).expect("encodable")
}

async fn suite(on: SearchOn) {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = if on == SearchOn::Postgres { Backend::Postgres } else { Backend::Sqlite };
    let mut sources = sources_on(backend, dir.path())
        .await
        .with("pipeline.window", "2s")
        .with("pipeline.max_out_of_orderness", "1s")
        .with("pipeline.allowed_lateness", "1s")
        .with("pipeline.idle_timeout", "1h")
        .with("scoring.warmup_windows", 2)
        .with("scoring.learning_windows", 2);
    let double = if on == SearchOn::Elasticsearch {
        let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in starts");
        sources = sources
            .with("elasticsearch.enabled", true)
            .with("elasticsearch.urls", vec![double.url()])
            .with("elasticsearch.index", "tidemark-predictions-%Y.%m.%d")
            .with("elasticsearch.linger", "20ms");
        Some(double)
    } else {
        None
    };
    let runtime = common::start(sources).await;
    let client = Client::new(&runtime);
    let lines = workload(SimConfig {
        sensors: 30,
        rate: 1500.0,
        duration: Some(Duration::from_secs(24)),
        seed: 11,
        anomalies: 6,
        anomalies_after: Duration::from_secs(8),
        anomaly_duration: Duration::from_secs(4),
        ..SimConfig::default()
    });
    post_batches(&client, &lines, 2000, Duration::from_millis(200)).await;

    // Wait for the results to settle in the store (and, with Elasticsearch, for the
    // cluster to hold exactly the same windows).
    let rows = eventually(Duration::from_secs(60), "results to settle", || {
        let client = &client;
        let double = double.clone();
        async move {
            let first = common::all_predictions(client).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
            let second = common::all_predictions(client).await;
            if first.len() < 300 || common::comparable(&first) != common::comparable(&second) {
                return None;
            }
            if let Some(double) = double {
                double.refresh();
                let mut in_es: Vec<Value> =
                    double.documents("tidemark-predictions-*").into_iter().map(|(_, _, source)| source).collect();
                in_es.sort_by_key(key);
                if common::comparable(&in_es) != common::comparable(&second) {
                    return None;
                }
            }
            Some(second)
        }
    })
    .await;
    let anomalies = rows.iter().filter(|row| row["anomaly"] == true).count();
    assert!(anomalies > 0, "the workload should produce anomalous windows");

    let sensor = rows[rows.len() / 2]["sensorId"].as_str().expect("sensor id").to_string();
    // A phrase of the explanation of an anomalous window (what an operator would search).
    let phrase = rows
        .iter()
        .find(|row| row["anomaly"] == true)
        .and_then(|row| {
            let words: Vec<String> = tidemark::search::words(row["explanation"].as_str()?).take(2).collect();
            (words.len() == 2).then(|| format!("\"{} {}\"", words[0], words[1]))
        })
        .expect("an anomalous window with an explanation");
    let cases: Vec<(String, String, RowFilter)> = vec![
        (sensor.clone(), String::new(), Box::new(|_| true)),
        ("temperature".into(), String::new(), Box::new(|_| true)),
        ("\"sensor 000\"*".into(), String::new(), Box::new(|_| true)),
        ("\"sensor 001".into(), String::new(), Box::new(|_| true)),
        ("s* -e*".into(), String::new(), Box::new(|_| true)),
        ("hum* -sensor-0001".into(), String::new(), Box::new(|_| true)),
        ("-temperature -humidity".into(), String::new(), Box::new(|_| true)),
        (phrase.clone(), String::new(), Box::new(|_| true)),
        ("learn*".into(), "&eventType=pressure".into(), Box::new(|row| row["eventType"] == "pressure")),
        ("sensor".into(), "&anomaly=true".into(), Box::new(|row| row["anomaly"] == true)),
        (
            "SENSOR".into(),
            "&severity=HIGH,CRITICAL".into(),
            Box::new(|row| row["severity"] == "HIGH" || row["severity"] == "CRITICAL"),
        ),
        (
            "-vibration".into(),
            "&from=2026-01-01T00:00:06Z&to=2026-01-01T00:00:14Z".into(),
            Box::new(|row| {
                let start = row["windowStart"].as_str().unwrap_or("");
                ("2026-01-01T00:00:06".."2026-01-01T00:00:14").contains(&start)
            }),
        ),
        (
            format!("\"{sensor}\""),
            format!("&sensorId={sensor}"),
            Box::new({
                let sensor = sensor.clone();
                move |row| row["sensorId"] == sensor.as_str()
            }),
        ),
    ];
    for (q, filters, filter) in &cases {
        let want = expected(&rows, q, filter);
        let found = search_all(&client, &format!("{}{filters}", encode(q)), 37).await;
        let mut keys: Vec<String> = found.iter().map(key).collect();
        keys.sort();
        assert_eq!(keys.len(), want.len(), "{on:?}: q={q} {filters}: {} results, expected {}", keys.len(), want.len());
        assert_eq!(keys, want, "{on:?}: q={q} {filters}");
        eprintln!("{on:?}: q={q} {filters}: {} of {} windows", keys.len(), rows.len());
        // The item shape of /api/predictions.
        if let Some(first) = found.first() {
            for field in [
                "id",
                "sensorId",
                "eventType",
                "windowStart",
                "windowEnd",
                "avgValue",
                "predictionScore",
                "anomaly",
                "severity",
                "explanation",
                "createdAt",
                "updatedAt",
            ] {
                assert!(first.get(field).is_some(), "{on:?}: search items lack {field}: {first}");
            }
        }
    }
    assert!(cases.iter().any(|(q, _, f)| !expected(&rows, q, f).is_empty()), "the cases should find something");

    // Histogram: windows and anomalies per 4 s and event type, as counted from the rows.
    let mut want: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    let query = TextQuery::parse("-sensor-0002").expect("valid").expect("non-empty");
    for row in &rows {
        let text = searchable_text(
            row["sensorId"].as_str().unwrap_or(""),
            row["eventType"].as_str().unwrap_or(""),
            row["severity"].as_str().unwrap_or(""),
            row["explanation"].as_str().unwrap_or(""),
        );
        if !query.matches(&text) {
            continue;
        }
        let start = chrono::DateTime::parse_from_rfc3339(row["windowStart"].as_str().unwrap_or(""))
            .expect("rfc3339")
            .timestamp_millis();
        let bucket = tidemark::store::ser::rfc3339(start.div_euclid(4000) * 4000);
        let entry = want.entry((bucket, row["eventType"].as_str().unwrap_or("").to_string())).or_default();
        entry.0 += 1;
        entry.1 += i64::from(row["anomaly"] == true);
    }
    let histogram = client.get_ok(&format!("/api/search/histogram?interval=4s&{}", encode("-sensor-0002"))).await;
    let got: BTreeMap<(String, String), (i64, i64)> = histogram["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| {
            (
                (b["start"].as_str().unwrap_or("").to_string(), b["eventType"].as_str().unwrap_or("").to_string()),
                (b["windows"].as_i64().unwrap_or(-1), b["anomalies"].as_i64().unwrap_or(-1)),
            )
        })
        .collect();
    assert_eq!(got, want, "{on:?}: histogram");

    // Errors name the parameter.
    for (path, parameter) in [
        (&*format!("/api/search?q={}", "x".repeat(513)), "q:"),
        ("/api/search?q=x&limit=0", "limit:"),
        ("/api/search?q=x&cursor=nope", "cursor:"),
        ("/api/search?query=x", "query:"),
        ("/api/search/histogram?interval=0s", "interval:"),
        ("/api/search/histogram?interval=1ms", "interval:"),
    ] {
        let (status, body) = client.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["error"]["message"].as_str().or(body["message"].as_str()).unwrap_or_default().to_string();
        assert!(message.starts_with(parameter) || body.to_string().contains(parameter), "{path}: {body}");
    }
    let status = client.get_ok("/api/status").await;
    let expected_backend = match on {
        SearchOn::Sqlite => "sqlite",
        SearchOn::Postgres => "postgres",
        SearchOn::Elasticsearch => "elasticsearch",
    };
    assert_eq!(status["search"], expected_backend);
    if let Some(double) = &double {
        assert_eq!(double.violations(), Vec::<String>::new(), "requests the cluster would refuse as malformed");
    }
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_api_on_sqlite() {
    suite(SearchOn::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_api_on_postgres() {
    suite(SearchOn::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_api_on_elasticsearch() {
    suite(SearchOn::Elasticsearch).await;
}
