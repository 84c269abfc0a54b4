//! The CLI as a person or an init container runs it: `check-config` reports every
//! configuration problem once, with the key as the user writes it; `doctor` checks a real
//! PostgreSQL and the Kafka mock cluster, right and wrong; logs written to a pipe carry
//! no colour codes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn tidemark(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    command.args(args);
    // Only what the test sets: the developer's own TIDEMARK__ settings stay out.
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("TIDEMARK__")) {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("tidemark runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// The `  - ` lines of a configuration error report.
fn problems(report: &str) -> Vec<&str> {
    report.lines().filter_map(|line| line.strip_prefix("  - ")).collect()
}

#[test]
fn check_config_reports_each_problem_once_with_the_key_as_written() {
    let output =
        tidemark(&["check-config"], &[("TIDEMARK__PIPELINE__WINDOW", "2x"), ("TIDEMARK__PIPELINE__BOGUS", "1")]);
    let report = text(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    let found = problems(&report);
    assert_eq!(found.len(), 2, "{report}");
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("pipeline.bogus (TIDEMARK__PIPELINE__BOGUS): unknown key") && p.contains("window")),
        "{report}"
    );
    assert!(
        found.iter().any(|p| p.starts_with(
            "pipeline.window (TIDEMARK__PIPELINE__WINDOW) = \"2x\" (from the environment): expected a duration"
        ) && p.contains("\"5s\"")),
        "{report}"
    );

    // A file with six problems of three kinds: all six, each once.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[pipeline]\npartitions = 0\nwindow = \"2x\"\nbogus = 1\n[scoring]\nmodel = \"nope\"\nthreshold = 1.5\n[http]\nlisten = \"nope\"\n",
    )
    .expect("write");
    let output = tidemark(&["--config", &file.display().to_string(), "check-config"], &[]);
    let report = text(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    let found = problems(&report);
    assert_eq!(found.len(), 6, "{report}");
    for key in [
        "pipeline.partitions",
        "pipeline.window",
        "pipeline.bogus",
        "scoring.model",
        "scoring.threshold",
        "http.listen",
    ] {
        let lines: Vec<&&str> = found.iter().filter(|p| p.starts_with(&format!("{key} "))).collect();
        assert_eq!(lines.len(), 1, "{key} in {report}");
        assert!(lines[0].contains(&file.display().to_string()), "{key}: no origin in {report}");
    }
    assert!(found.iter().any(|p| p.contains("pipeline.partitions (TIDEMARK__PIPELINE__PARTITIONS) = 0")), "{report}");
    assert!(found.iter().any(|p| p.contains("= \"nope\"") && p.contains("\"context\"")), "{report}");
}

#[test]
fn check_config_prints_effective_values() {
    let output = tidemark(&["check-config"], &[]);
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(printed.contains("dlq_topic = \"sensor-events.dlq\""), "{printed}");
    assert!(printed.contains("log_dir = \"data/tidemark.db.ingest-log\""), "{printed}");
}

#[test]
fn check_config_names_the_faulty_rule_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.toml");
    std::fs::write(
        &file,
        r#"
[rules.ok]
kind = "threshold"
above = 40.0
[rules.no_limit]
kind = "threshold"
stat = "max"
[rules.short_run]
kind = "consecutive"
count = 1
[rules.loud]
kind = "anomaly"
severity = "urgent"
message = "{sensorId} is {mood}"
[rules.wrong_field]
kind = "absence"
after = "1m"
within = "2m"
[rules.empty_pattern]
kind = "pattern"
within = "2m"
"#,
    )
    .expect("write");
    let output = tidemark(&["--config", &file.display().to_string(), "check-config"], &[]);
    let report = text(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    let found = problems(&report);
    for (key, says) in [
        ("rules.no_limit.above", "needs above"),
        ("rules.short_run.count", "at least 2"),
        ("rules.loud.severity", "\"urgent\""),
        ("rules.loud.message", "{mood}"),
        ("rules.wrong_field.within", "does not apply to absence rules"),
        ("rules.empty_pattern.steps", ""),
    ] {
        // `key: why`, or `key (TIDEMARK__…) = value (from FILE): why` when the key is set.
        let named = |p: &&str| p.strip_prefix(key).is_some_and(|rest| rest.starts_with(": ") || rest.starts_with(" ("));
        assert!(found.iter().any(|p| named(p) && p.contains(says)), "{key}: {says} not in\n{report}");
    }
    assert!(!found.iter().any(|p| p.starts_with("rules.ok")), "{report}");
    assert_eq!(found.len(), 6, "{report}");
}

/// `kill -HUP` reloads the rules from the file; a file with a faulty rule keeps the
/// rules in force and says why in the log.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_reloads_the_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tidemark.toml");
    let settings = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{}\"\n[ingest]\nlog_dir = \"{}\"\n[log]\nformat = \"text\"\n",
        dir.path().join("t.db").display(),
        dir.path().join("log").display()
    );
    std::fs::write(&file, format!("{settings}[rules.hot]\nkind = \"threshold\"\nabove = 40.0\n")).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(["--config", &file.display().to_string(), "run"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| -> String {
        loop {
            match lines_rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {what:?}"),
            }
        }
    };
    let running = next_line("tidemark is running");
    let addr = running
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr in {running}"))
        .to_string();
    let http = reqwest::Client::new();
    let names = |http: reqwest::Client, addr: String| async move {
        let body: serde_json::Value =
            http.get(format!("http://{addr}/api/rules")).send().await.expect("reachable").json().await.expect("json");
        body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(http.clone(), addr.clone()).await, ["anomaly", "hot"]);
    let hangup = || {
        let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().expect("kill runs");
        assert!(status.success());
    };

    std::fs::write(
        &file,
        format!("{settings}[rules.anomaly]\nenabled = false\n[rules.cold]\nkind = \"threshold\"\nbelow = 0.0\n"),
    )
    .expect("write");
    hangup();
    next_line("alert rules reloaded");
    assert_eq!(names(http.clone(), addr.clone()).await, ["cold"], "hot is gone, anomaly disabled, cold added");

    std::fs::write(&file, format!("{settings}[rules.cold]\nkind = \"threshold\"\n")).expect("write");
    hangup();
    let refused = next_line("alert rules not reloaded");
    let detail = next_line("rules.cold.above");
    assert!(detail.contains("needs above"), "{refused}\n{detail}");
    assert_eq!(names(http.clone(), addr.clone()).await, ["cold"], "the rules in force stay");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .arg("run")
        .env("TIDEMARK__HTTP__LISTEN", "127.0.0.1:0")
        .env("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.path().join("t.db").display()))
        .env("TIDEMARK__LOG__FORMAT", "text")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let running = line.contains("tidemark is running");
        lines.push(line);
        if running {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = lines.join("\n");
    assert!(log.contains("tidemark is running"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a piped log:\n{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_postgres_and_kafka_and_says_what_is_wrong() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tidemark::sim::kafka::MockBroker;

    let topics = [("sensor-events".to_string(), 3), ("sensor-events.dlq".to_string(), 1)];
    let mock = MockBroker::start(1, &topics, Duration::ZERO).expect("mock cluster");
    let brokers = mock.bootstrap_servers().expect("bootstrap servers");
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("producer");
    for i in 0..30 {
        let payload = format!("{{\"sensorId\":\"s{i}\",\"eventType\":\"t\",\"value\":1}}");
        producer
            .send(FutureRecord::to("sensor-events").key(&format!("s{i}")).payload(&payload), Duration::from_secs(5))
            .await
            .expect("produced");
    }
    let url = common::fresh_postgres_database().await;
    let base = [
        ("TIDEMARK__STORE__URL", url.as_str()),
        ("TIDEMARK__KAFKA__ENABLED", "true"),
        ("TIDEMARK__INGEST__MODE", "kafka"),
        ("TIDEMARK__KAFKA__BROKERS", brokers.as_str()),
        ("TIDEMARK__KAFKA__GROUP_ID", "doctor"),
        ("TIDEMARK__LOG__LEVEL", "error"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };

    // A new database, partitions right: the schema is pending (a warning, not a failure).
    let output = tidemark(&["doctor"], &with(&[("TIDEMARK__PIPELINE__PARTITIONS", "3")]));
    let report = text(&output);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("warn  store") && report.contains("migration 0 of"), "{report}");
    assert!(report.contains("ok    clock"), "{report}");
    assert!(report.contains("topic sensor-events has 3 partitions = pipeline.partitions"), "{report}");
    assert!(report.contains("consumer group doctor: lag 30 message(s)"), "{report}");
    assert!(report.contains("kafka.dlq_topic sensor-events.dlq exists"), "{report}");

    // A results topic that does not exist fails: the Kafka sink could never write.
    let output = tidemark(
        &["doctor"],
        &with(&[("TIDEMARK__PIPELINE__PARTITIONS", "3"), ("TIDEMARK__KAFKA__RESULTS_TOPIC", "nowhere")]),
    );
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL  kafka          kafka.results_topic nowhere does not exist"), "{report}");

    // Migrated: all ok.
    let migrated = tidemark(&["migrate"], &with(&[]));
    assert!(migrated.status.success(), "{}", text(&migrated));
    let output = tidemark(&["doctor"], &with(&[("TIDEMARK__PIPELINE__PARTITIONS", "3")]));
    let report = text(&output);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("ok    store") && !report.contains("FAIL"), "{report}");

    // Wrong partition count: a failure that says what to set.
    let output = tidemark(&["doctor"], &with(&[("TIDEMARK__PIPELINE__PARTITIONS", "4")]));
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL  kafka") && report.contains("TIDEMARK__PIPELINE__PARTITIONS=3"), "{report}");

    // A topic that does not exist, a store nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let dead_store = format!("postgres://postgres@127.0.0.1:{closed}/postgres");
    let output = tidemark(
        &["doctor"],
        &with(&[("TIDEMARK__KAFKA__TOPIC", "no-such-topic")])
            .into_iter()
            .map(|(k, v)| if k == "TIDEMARK__STORE__URL" { (k, dead_store.as_str()) } else { (k, v) })
            .collect::<Vec<_>>(),
    );
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL  store") && report.contains(&format!("127.0.0.1:{closed}")), "{report}");
    assert!(report.contains("FAIL  kafka") && report.contains("no-such-topic"), "{report}");

    // An invalid configuration is a failed check too, with the same messages as check-config.
    let output = tidemark(&["doctor"], &with(&[("TIDEMARK__PIPELINE__WINDOW", "2x")]));
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL  configuration  pipeline.window (TIDEMARK__PIPELINE__WINDOW) = \"2x\""), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_mqtt_and_elasticsearch() {
    use tidemark::sim::es_double::EsDouble;
    let mqtt = common::mqtt_url();
    let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let urls = format!("[\"{}\"]", double.url());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let dead_mqtt = format!("mqtt://127.0.0.1:{closed}");
    let dead_es = format!("[\"http://127.0.0.1:{closed}\"]");
    let run = |mqtt: &str, es: &str| {
        tidemark(
            &["doctor"],
            &[
                ("TIDEMARK__STORE__URL", store.as_str()),
                ("TIDEMARK__MQTT__ENABLED", "true"),
                ("TIDEMARK__MQTT__URL", mqtt),
                ("TIDEMARK__MQTT__CLIENT_ID", "doctor-test"),
                ("TIDEMARK__ELASTICSEARCH__ENABLED", "true"),
                ("TIDEMARK__ELASTICSEARCH__URLS", es),
            ],
        )
    };

    let output = run(&mqtt, &urls);
    let report = text(&output);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("ok    mqtt") && report.contains("connected (MQTT 5)"), "{report}");
    assert!(report.contains("ok    elasticsearch") && report.contains("cluster health is"), "{report}");
    // The template is the sink's to create: missing is a warning, not a failure.
    assert!(report.contains("warn  elasticsearch  index template"), "{report}");

    let output = run(&dead_mqtt, &dead_es);
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL  mqtt") && report.contains(&dead_mqtt), "{report}");
    assert!(report.contains("FAIL  elasticsearch"), "{report}");
}
