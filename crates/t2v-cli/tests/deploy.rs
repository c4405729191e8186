//! The deployment files: the Kubernetes manifests in deploy/kubernetes against the Kubernetes API's
//! schemas (with kubernetes-validate, when T2V_TEST_KUBERNETES_VALIDATE names it or it is on the
//! PATH), and what they must say for t2v (parsed here always): the API alone behind a Service with
//! probes on /health, workers scaled by KEDA on the queue's depth, non-root containers, the volumes.
//! The Dockerfile is read, not built (building it needs a container engine).

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of every manifest, by kind and name.
fn documents() -> Vec<(String, String, Yaml)> {
    let mut docs = Vec::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display())) {
            let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without a kind", file.display()));
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            docs.push((kind.to_string(), name, doc.clone()));
        }
    }
    docs
}

fn find<'a>(docs: &'a [(String, String, Yaml)], kind: &str, name: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|(k, n, _)| k == kind && n == name).map(|(_, _, d)| d).collect()
}

fn strings(y: &Yaml) -> Vec<&str> {
    y.as_vec().map(|v| v.iter().filter_map(Yaml::as_str).collect()).unwrap_or_default()
}

#[test]
fn manifests_say_what_t2v_needs() {
    let docs = documents();
    let api = find(&docs, "Deployment", "t2v-api");
    assert_eq!(api.len(), 1);
    let pod = &api[0]["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    assert_eq!(&args[..1], ["serve"]);
    assert!(args.windows(2).any(|w| w == ["--workers", "0"]), "{args:?}");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some("/health"), "{probe}");
    }
    let env: Vec<&str> = c["env"].as_vec().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains(&"T2V_QUEUE") && env.contains(&"T2V_API_KEY"), "{env:?}");
    let service = find(&docs, "Service", "t2v");
    assert_eq!(service[0]["spec"]["selector"], api[0]["spec"]["selector"]["matchLabels"]);

    // The CPU and CUDA workers: the same Deployment, the CUDA one asking for a GPU.
    let workers = find(&docs, "Deployment", "t2v-worker");
    assert_eq!(workers.len(), 2);
    let mut gpus = Vec::new();
    for w in &workers {
        let c = &w["spec"]["template"]["spec"]["containers"][0];
        let args = strings(&c["args"]);
        assert_eq!(&args[..1], ["worker"]);
        assert!(args.contains(&"--health"), "{args:?}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/health"));
        let volumes: Vec<&str> =
            c["volumeMounts"].as_vec().unwrap().iter().filter_map(|m| m["mountPath"].as_str()).collect();
        assert_eq!(volumes, ["/data", "/models", "/tmp"]);
        gpus.push(c["resources"]["limits"]["nvidia.com/gpu"].as_i64());
    }
    gpus.sort();
    assert_eq!(gpus, [None, Some(1)]);
    for claim in ["t2v-data", "t2v-models"] {
        let pvc = find(&docs, "PersistentVolumeClaim", claim);
        assert_eq!(strings(&pvc[0]["spec"]["accessModes"]), ["ReadWriteMany"], "{claim}");
    }

    // KEDA: the worker Deployment, scaled on the queue's depth by the PostgreSQL scaler.
    let scaled = find(&docs, "ScaledObject", "t2v-worker");
    assert_eq!(scaled[0]["spec"]["scaleTargetRef"]["name"].as_str(), Some("t2v-worker"));
    let trigger = &scaled[0]["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("postgresql"));
    let query = trigger["metadata"]["query"].as_str().unwrap();
    assert!(query.contains("FROM jobs") && query.contains("'queued'"), "{query}");
    let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
    let auth = find(&docs, "TriggerAuthentication", auth);
    assert_eq!(auth[0]["spec"]["secretTargetRef"][0]["parameter"].as_str(), Some("connection"));

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2, "multi-stage");
    assert!(dockerfile.lines().any(|l| l.starts_with("USER ") && !l.contains("root") && !l.contains(" 0")));
}

#[test]
fn manifests_match_the_kubernetes_schemas() {
    let tool = std::env::var("T2V_TEST_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let Ok(out) = Command::new(&tool).arg("--strict").args(manifests()).output() else {
        t2v_testkit::skip(format!(
            "{tool} is missing (pip install kubernetes-validate, or set T2V_TEST_KUBERNETES_VALIDATE)"
        ));
        return;
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success() && !text.contains("ERROR"), "{text}");
    // Every Kubernetes kind was checked; KEDA's own kinds have no schema there.
    for kind in ["deployment/t2v-api", "service/t2v", "deployment/t2v-worker", "persistentvolumeclaim/t2v-data"] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind}: {text}");
    }
}
