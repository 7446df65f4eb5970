//! The delivery files, checked as far as this machine can: no container
//! engine or Kubernetes runs here, so the Dockerfile is linted (hadolint),
//! every YAML file is parsed and linted (yamllint), the Compose file and the
//! GitHub Actions workflow are validated against their schemas
//! (check-jsonschema's copies), and Prometheus' configuration is checked by
//! promtool. `plinth health`, the image's health check, is run for real.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{TEST_ENCRYPTION_KEY, TestDb, TestResult, tool};
use crate::processes::Serve;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(mut cmd: std::process::Command, what: &str) -> TestResult<String> {
    let out =
        cmd.current_dir(root()).output().map_err(|e| format!("running {what} (scripts/test.sh installs it): {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("{what} failed:\n{text}").into());
    }
    Ok(text)
}

#[test]
fn the_dockerfile_compose_kubernetes_and_workflow_files_pass_their_checks() -> TestResult {
    let mut hadolint = tool("hadolint");
    hadolint.arg("Dockerfile");
    run(hadolint, "hadolint")?;

    let mut yamllint = tool("yamllint");
    yamllint.args(["--strict", "-d", "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}}}", "deploy", ".github"]);
    run(yamllint, "yamllint")?;

    let mut compose = tool("check-jsonschema");
    compose.args(["--builtin-schema", "vendor.compose-spec", "deploy/compose.yaml"]);
    run(compose, "check-jsonschema (Compose)")?;
    let mut workflow = tool("check-jsonschema");
    workflow.args(["--builtin-schema", "vendor.github-workflows", ".github/workflows/ci.yml"]);
    run(workflow, "check-jsonschema (GitHub Actions)")?;

    let mut promtool = std::process::Command::new("promtool");
    promtool.args(["check", "config", "--syntax-only", "deploy/prometheus/prometheus.yml"]);
    run(promtool, "promtool")?;

    // Every Kubernetes object names its kind and version, and every file
    // the kustomization lists is there.
    let k8s = root().join("deploy/k8s");
    let kustomization = std::fs::read_to_string(k8s.join("kustomization.yaml"))?;
    for line in kustomization.lines().map(str::trim).filter(|l| l.starts_with("- ") && l.ends_with(".yaml")) {
        assert!(k8s.join(&line[2..]).exists(), "{line} is listed but missing");
    }
    for entry in std::fs::read_dir(&k8s)? {
        let text = std::fs::read_to_string(entry?.path())?;
        for document in text.split("\n---\n") {
            assert!(document.contains("apiVersion:") && document.contains("kind:"), "{document}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn plinth_health_answers_for_the_container_health_check() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let serve = Serve::start(&[("DATABASE_URL", &testdb.url), ("PLINTH_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)]).await?;
    let health = |listen: String| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
            .arg("health")
            .env("PLINTH_LISTEN", listen)
            .env_remove("DATABASE_URL")
            .output()
    };
    let port = serve.base.rsplit(':').next().ok_or("no port")?;
    let out = health(format!("0.0.0.0:{port}")).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Nobody listening: not healthy, and says where it asked.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let out = tokio::time::timeout(Duration::from_secs(30), health(format!("127.0.0.1:{free}"))).await??;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no answer from 127.0.0.1:{free}")));
    Ok(())
}
