//! The deployment files: `deploy/compose.yaml` against the Compose Specification's JSON
//! schema, the Kubernetes overlays rendered (`scripts/kustomize-lite.py`) and validated by
//! `kubernetes-validate` (core objects) and KEDA's `ScaledObject` schema, the invariants
//! between them (replicas ≤ partitions, grace period > shutdown timeout, non-root,
//! read-only root filesystem, probes), and the Dockerfile's structure. No container
//! engine runs on the test machines, so the image is checked statically.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("TIDEMARK_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "TIDEMARK_TEST_PYTHON is not set: the deployment checks need a Python with jsonschema, pyyaml and \
             kubernetes-validate. Run scripts/test.sh (it makes one), or pip install them and set \
             TIDEMARK_TEST_PYTHON=/path/to/python"
        )
    })
}

/// Run a Python snippet that prints one JSON document; fail with its output otherwise.
fn python_json(script: &str, args: &[&str]) -> Value {
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", python()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

const LOAD_YAML: &str = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(json.dumps(docs))
"#;

const VALIDATE: &str = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
validator = jsonschema.validators.validator_for(schema)(schema)
errors = []
for doc in yaml.safe_load_all(open(sys.argv[2])):
    if not doc or (len(sys.argv) > 3 and doc.get("kind") != sys.argv[3]):
        continue
    errors += ["%s: %s" % ("/".join(map(str, e.path)), e.message) for e in validator.iter_errors(doc)]
print(json.dumps(errors))
"#;

fn schema_errors(schema: &Path, file: &Path, kind: Option<&str>) -> Vec<String> {
    let mut args = vec![schema.to_str().expect("path"), file.to_str().expect("path")];
    args.extend(kind);
    let errors = python_json(VALIDATE, &args);
    errors.as_array().expect("list").iter().map(|e| e.as_str().unwrap_or_default().to_string()).collect()
}

#[test]
fn the_compose_stack_follows_the_compose_specification() {
    let compose = root().join("deploy/compose.yaml");
    let errors = schema_errors(&root().join("deploy/schema/compose-spec.json"), &compose, None);
    assert!(errors.is_empty(), "deploy/compose.yaml does not follow the Compose Specification:\n{errors:#?}");

    // The schema catches a misspelt key (so the check above can fail).
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("compose.yaml");
    let text = std::fs::read_to_string(&compose).expect("compose");
    std::fs::write(&broken, text.replacen("stop_grace_period:", "stop_grace_periodd:", 1)).expect("write");
    assert!(!schema_errors(&root().join("deploy/schema/compose-spec.json"), &broken, None).is_empty());

    let docs = python_json(LOAD_YAML, &[compose.to_str().expect("path")]);
    let services = &docs[0]["services"];
    for name in [
        "kafka",
        "postgres",
        "elasticsearch",
        "mosquitto",
        "prometheus",
        "grafana",
        "tempo",
        "tidemark-1",
        "tidemark-2",
        "simulator",
    ] {
        assert!(services.get(name).is_some(), "no service {name}");
    }
    assert!(services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].as_str().is_some_and(|r| r.contains("controller")));
    let group = |s: &str| services[s]["environment"]["TIDEMARK__KAFKA__GROUP_ID"].clone();
    assert_eq!(group("tidemark-1"), group("tidemark-2"), "the two instances share a consumer group");
    assert!(group("tidemark-1").is_string());
    // Every published port on loopback only; every mounted file exists.
    for (name, service) in services.as_object().expect("services") {
        for port in service["ports"].as_array().into_iter().flatten() {
            assert!(
                port.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
                "{name} publishes {port} beyond loopback"
            );
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            if let Some(source) = volume.as_str().and_then(|v| v.split(':').next()).filter(|s| s.starts_with('.')) {
                assert!(root().join("deploy").join(source).exists(), "{name} mounts {source}, which does not exist");
            }
        }
    }
}

/// An overlay rendered by `scripts/kustomize-lite.py` (kustomize's behaviour for the
/// features deploy/k8s uses; kustomize itself cannot be installed on the test machines),
/// written to a file.
fn render(overlay: &str, dir: &Path) -> PathBuf {
    let output = Command::new(python())
        .arg(root().join("scripts/kustomize-lite.py"))
        .arg(root().join("deploy/k8s/overlays").join(overlay))
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", python()));
    assert!(output.status.success(), "render {overlay}: {}", String::from_utf8_lossy(&output.stderr));
    let file = dir.join(format!("{overlay}.yaml"));
    std::fs::write(&file, &output.stdout).expect("write");
    file
}

fn seconds(duration: &str) -> u64 {
    humantime::parse_duration(duration).expect("a duration").as_secs()
}

#[test]
fn the_kubernetes_overlays_render_and_validate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let validate = Path::new(&python()).with_file_name("kubernetes-validate");
    let keda = root().join("deploy/k8s/schema/keda-scaledobject-v1alpha1.json");
    for overlay in ["production", "dev"] {
        let file = render(overlay, dir.path());
        let output = Command::new(&validate)
            .args(["--strict", "--kubernetes-version", "1.32"])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", validate.display()));
        let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success() && !report.contains("ERROR"), "{overlay}:\n{report}");
        let errors = schema_errors(&keda, &file, Some("ScaledObject"));
        assert!(errors.is_empty(), "{overlay}: ScaledObject against KEDA's schema:\n{errors:#?}");

        let docs = python_json(LOAD_YAML, &[file.to_str().expect("path")]);
        let docs = docs.as_array().expect("documents");
        let of = |kind: &str| docs.iter().filter(|d| d["kind"] == kind).collect::<Vec<_>>();
        for kind in
            ["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ScaledObject"]
        {
            assert!(!of(kind).is_empty(), "{overlay}: no {kind}");
        }
        assert!(of("StatefulSet").is_empty(), "{overlay}: PostgreSQL is external, no StatefulSet");
        assert!(of("Secret").is_empty(), "{overlay}: no secret in the manifests (secret.example.yaml is separate)");

        // The ConfigMap holds only valid overrides: check-config takes it.
        let toml = of("ConfigMap")[0]["data"]["tidemark.toml"].as_str().expect("tidemark.toml").to_string();
        let config_file = dir.path().join(format!("{overlay}.toml"));
        std::fs::write(&config_file, &toml).expect("write");
        let checked = Command::new(env!("CARGO_BIN_EXE_tidemark"))
            .arg("--config")
            .arg(&config_file)
            .arg("check-config")
            .env("TIDEMARK__AUTH__KEYS_FILE", "")
            .env("TIDEMARK__STORE__URL", "postgres://tidemark@tidemark-postgres:5432/tidemark")
            .output()
            .expect("check-config runs");
        assert!(checked.status.success(), "{overlay}: {}", String::from_utf8_lossy(&checked.stderr));
        let effective: toml::Value = toml::from_str(&String::from_utf8_lossy(&checked.stdout)).expect("effective toml");
        let partitions = effective["pipeline"]["partitions"].as_integer().expect("partitions");
        let shutdown = seconds(effective["shutdown"]["timeout"].as_str().expect("timeout"));

        let scaled = of("ScaledObject")[0];
        let max = scaled["spec"]["maxReplicaCount"].as_i64().expect("maxReplicaCount");
        assert!(max <= partitions, "{overlay}: maxReplicaCount {max} > pipeline.partitions {partitions}");
        for trigger in scaled["spec"]["triggers"].as_array().expect("triggers") {
            if trigger["type"] == "kafka" {
                assert_eq!(trigger["metadata"]["allowIdleConsumers"], "false", "{overlay}");
                assert_eq!(trigger["metadata"]["consumerGroup"].as_str(), effective["kafka"]["group_id"].as_str());
                assert_eq!(trigger["metadata"]["topic"].as_str(), effective["kafka"]["topic"].as_str());
            }
        }

        let deployment = of("Deployment")[0];
        let pod = &deployment["spec"]["template"]["spec"];
        let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
        assert!(grace > shutdown, "{overlay}: grace {grace}s is not above shutdown.timeout {shutdown}s");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}");
        assert!(pod["affinity"]["podAntiAffinity"].is_object(), "{overlay}: no anti-affinity");
        let containers: Vec<&Value> =
            pod["containers"].as_array().into_iter().chain(pod["initContainers"].as_array()).flatten().collect();
        for container in &containers {
            assert_eq!(
                container["securityContext"]["readOnlyRootFilesystem"], true,
                "{overlay}: {}",
                container["name"]
            );
            assert!(container["resources"]["requests"].is_object(), "{overlay}: {} has no requests", container["name"]);
        }
        assert!(containers.iter().any(|c| c["args"][0] == "doctor"), "{overlay}: no doctor init container");
        let main = containers.iter().find(|c| c["name"] == "tidemark").expect("the tidemark container");
        assert_eq!(main["livenessProbe"]["httpGet"]["path"], "/health");
        assert_eq!(main["readinessProbe"]["httpGet"]["path"], "/ready");
        assert!(main["resources"]["limits"]["memory"].is_string());
    }

    // The Secret example is a valid Secret.
    let output = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.32"])
        .arg(root().join("deploy/k8s/secret.example.yaml"))
        .output()
        .expect("kubernetes-validate");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn the_dockerfile_builds_dependencies_apart_and_runs_as_a_non_root_user_without_a_shell() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    // Instructions, continuation lines joined, comments dropped.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            instructions.push(std::mem::take(&mut current));
        }
    }
    let stages: Vec<usize> =
        instructions.iter().enumerate().filter(|(_, i)| i.starts_with("FROM ")).map(|(n, _)| n).collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let (build, runtime) = (&instructions[stages[0]..stages[1]], &instructions[stages[1]..]);
    let position = |stage: &[String], prefix: &str| stage.iter().position(|i| i.starts_with(prefix));
    let manifests = position(build, "COPY Cargo.toml Cargo.lock").expect("the manifests copied alone");
    let dependencies = build.iter().position(|i| i.contains("cargo build")).expect("a dependency build");
    let sources = position(build, "COPY . .").expect("the sources copied");
    assert!(manifests < dependencies && dependencies < sources, "dependencies are built before the sources are copied");
    assert!(build.iter().any(|i| i.contains("--locked")), "builds with the lock file");

    let user = runtime.iter().find_map(|i| i.strip_prefix("USER ")).expect("USER in the runtime stage").trim();
    assert!(!["root", "0", "0:0"].contains(&user), "runs as {user}");
    assert!(runtime.iter().all(|i| !i.starts_with("RUN ")), "the runtime stage runs nothing (no shell there)");
    assert!(runtime[0].contains("distroless"), "a runtime image without a shell: {}", runtime[0]);
    assert!(runtime.iter().any(|i| i.trim() == "STOPSIGNAL SIGTERM"));
    assert!(runtime.iter().any(|i| i.starts_with("VOLUME ") && i.contains("/var/lib/tidemark/data")));
    assert!(runtime.iter().any(|i| i.starts_with("ENTRYPOINT [\"")), "ENTRYPOINT in exec form");
    for label in ["title", "version", "revision", "licenses", "source"] {
        assert!(text.contains(&format!("org.opencontainers.image.{label}=")), "OCI label {label}");
    }
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    assert!(ignored.lines().any(|l| l.trim_end_matches('/') == "target"), "target/ stays out of the build context");
}

/// The Dockerfile's runtime stage, built for real with buildah: base images cannot be
/// pulled here, so the stage is built `FROM scratch` with the locally built binary and the
/// shared libraries `ldd` names (what the distroless base provides) in place of the build
/// stage's output; every other instruction is the Dockerfile's own. The image must carry
/// the user, signal, labels, volume and entry point, and the binary must run in it.
#[test]
fn the_runtime_stage_builds_with_buildah_and_the_binary_runs_in_it() {
    let buildah = std::env::var("TIDEMARK_TEST_BUILDAH").unwrap_or_else(|_| "buildah".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let context = dir.path().join("context");
    let out = context.join("out");
    let bin = out.join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("dirs");
    std::fs::create_dir_all(out.join("var/lib/tidemark/data")).expect("dirs");
    let binary = env!("CARGO_BIN_EXE_tidemark");
    std::fs::copy(binary, bin.join("tidemark")).expect("copy binary");
    let ldd = Command::new("ldd").arg(binary).output().expect("ldd runs");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split("=>").last().unwrap_or_default().split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            let target = context.join("libs").join(path.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().expect("parent")).expect("dirs");
            std::fs::copy(path, &target).unwrap_or_else(|e| panic!("copy {path}: {e}"));
        }
    }

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let runtime_from = dockerfile.rfind("\nFROM ").expect("a runtime stage") + 1;
    let mut containerfile = String::new();
    for line in dockerfile[runtime_from..].lines() {
        if line.starts_with("FROM ") {
            containerfile.push_str("FROM scratch\nCOPY libs/ /\n");
        } else if let Some(rest) = line.strip_prefix("COPY --from=build ") {
            containerfile.push_str(&format!("COPY {}\n", rest.replacen("/out/", "out/", 1)));
        } else {
            containerfile.push_str(line);
            containerfile.push('\n');
        }
    }
    std::fs::write(context.join("Containerfile"), &containerfile).expect("write");

    let tag = format!("localhost/tidemark-test:{}", std::process::id());
    let run = |args: &[&str]| {
        let output = Command::new(&buildah)
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap_or_else(|error| {
                panic!("cannot run {buildah} ({error}): install buildah (Debian package; scripts/test.sh does) or set TIDEMARK_TEST_BUILDAH")
            });
        (
            output.status.success(),
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        )
    };
    let context_path = context.to_str().expect("path");
    let (built, log) = run(&["bud", "--isolation", "chroot", "--layers=false", "-t", &tag, context_path]);
    assert!(built, "buildah bud:\n{containerfile}\n{log}");

    let (inspected, json) = run(&["inspect", "--type", "image", &tag]);
    assert!(inspected, "{json}");
    let image: Value = serde_json::from_str(&json).expect("inspect JSON");
    let config = &image["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["StopSignal"], "SIGTERM");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/local/bin/tidemark"]));
    assert_eq!(config["Cmd"], serde_json::json!(["run"]));
    assert!(config["Volumes"].get("/var/lib/tidemark/data").is_some(), "{config}");
    assert_eq!(config["Labels"]["org.opencontainers.image.title"], "tidemark");
    assert_eq!(config["WorkingDir"], "/var/lib/tidemark");

    // The binary starts in the image (its libraries resolve) and reads the image's ENV.
    let (created, container) = run(&["from", "--isolation", "chroot", &tag]);
    assert!(created, "{container}");
    let container = container.lines().last().unwrap_or_default().trim().to_string();
    let (ran, printed) =
        run(&["run", "--isolation", "chroot", &container, "--", "/usr/local/bin/tidemark", "check-config"]);
    let _ = run(&["rm", &container]);
    let _ = run(&["rmi", "-f", &tag]);
    assert!(ran, "tidemark check-config in the image:\n{printed}");
    assert!(printed.contains("listen = \"0.0.0.0:8080\"") && printed.contains("format = \"json\""), "{printed}");
}
