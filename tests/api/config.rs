//! The command line and layered configuration (docs/configuration.md).

use crate::helpers::{bin, TestApp};
use std::process::{Command, Output};

fn roomhub(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir).args(args).env_remove("ROOMHUB_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run roomhub")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_config_prints_the_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = roomhub(dir.path(), &["check-config"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let settings: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(settings["server"]["bind"].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(settings["storage"]["data_dir"].as_str(), Some("./data"));
    assert_eq!(settings["storage"]["durability"].as_str(), Some("sync"));
    assert_eq!(settings["history"]["max_per_room"].as_integer(), Some(1000));
    assert_eq!(
        settings["limits"]["outbound_queue"].as_integer(),
        Some(1024)
    );
    assert_eq!(
        settings["cluster"]["subject_prefix"].as_str(),
        Some("roomhub")
    );
}

#[test]
fn layers_apply_in_order_and_secrets_are_masked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/default.toml"),
        "[history]\nreplay = 7\nmax_per_room = 70\n[auth]\napi_key = \"s3cret\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("mine.toml"), "[history]\nreplay = 8\n").unwrap();
    let out = roomhub(
        dir.path(),
        &["check-config", "--config", "mine.toml"],
        &[
            ("ROOMHUB_HISTORY__MAX_PER_ROOM", "90"),
            (
                "ROOMHUB_AUTH__ALLOWED_ORIGINS",
                "https://a.example,https://b.example",
            ),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let s: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(
        s["history"]["replay"].as_integer(),
        Some(8),
        "--config beats config/default.toml"
    );
    assert_eq!(
        s["history"]["max_per_room"].as_integer(),
        Some(90),
        "env beats files"
    );
    assert_eq!(
        s["auth"]["allowed_origins"].as_array().unwrap().len(),
        2,
        "lists are comma-separated"
    );
    assert!(!text(&out).contains("s3cret"));
    // ROOMHUB_CONFIG names the file too.
    let out = roomhub(
        dir.path(),
        &["check-config"],
        &[("ROOMHUB_CONFIG", "mine.toml")],
    );
    let s: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(s["history"]["replay"].as_integer(), Some(8));
}

#[test]
fn bad_settings_stop_start_up_with_exit_2_naming_key_and_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("typo.toml"),
        "[server]\nbindd = \"1.2.3.4:5\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("badvalue.toml"),
        "[history]\nmax_per_room = \"lots\"\n",
    )
    .unwrap();
    // (arguments, environment, what the error must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec!["--config", "typo.toml"],
            vec![],
            vec!["server.bindd", "typo.toml"],
        ),
        (
            vec!["--config", "badvalue.toml"],
            vec![],
            vec!["history.max_per_room", "badvalue.toml"],
        ),
        (
            vec![],
            vec![("ROOMHUB_SERVER__BINDD", "x")],
            vec!["server.bindd", "ROOMHUB_SERVER__BINDD"],
        ),
        (
            vec![],
            vec![("ROOMHUB_LIMITS__PUBLISH_BURST", "0")],
            vec!["limits.publish_burst", "ROOMHUB_LIMITS__PUBLISH_BURST"],
        ),
        (
            vec![],
            vec![("ROOMHUB_HEARTBEAT__TIMEOUT_MS", "5000")],
            vec!["heartbeat.timeout_ms"],
        ),
        (
            vec![],
            vec![("ROOMHUB_STORAGE__DURABILITY", "maybe")],
            vec!["storage.durability", "ROOMHUB_STORAGE__DURABILITY"],
        ),
        (
            vec![],
            vec![("ROOMHUB_STORAGE__COMMIT_DELAY_US", "5000000")],
            vec![
                "storage.commit_delay_us",
                "ROOMHUB_STORAGE__COMMIT_DELAY_US",
            ],
        ),
        (
            vec![],
            vec![("ROOMHUB_CLUSTER__NATS_URL", "http://127.0.0.1:4222")],
            vec!["cluster.nats_url", "ROOMHUB_CLUSTER__NATS_URL"],
        ),
        (
            vec![],
            vec![("ROOMHUB_SERVER__BIND", "nowhere")],
            vec!["server.bind"],
        ),
        (
            vec!["--config", "missing.toml"],
            vec![],
            vec!["missing.toml"],
        ),
    ];
    for (args, env, needles) in cases {
        for command in [vec!["check-config"], vec![]] {
            let mut all = command.clone();
            all.extend(&args);
            let out = roomhub(dir.path(), &all, &env);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{all:?} {env:?}: {}",
                text(&out)
            );
            for needle in &needles {
                assert!(
                    text(&out).contains(needle),
                    "{all:?} {env:?}: {needle} not in {}",
                    text(&out)
                );
            }
        }
    }
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = roomhub(dir.path(), &["--version"], &[]);
    assert!(out.status.success());
    assert!(text(&out).contains(env!("CARGO_PKG_VERSION")));
    let out = roomhub(dir.path(), &["--help"], &[]);
    assert!(out.status.success());
    assert!(text(&out).contains("check-config") && text(&out).contains("--config"));
}

#[test]
fn the_example_config_lists_valid_settings() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let out = roomhub(dir.path(), &["check-config", "--config", example], &[]);
    assert!(out.status.success(), "{}", text(&out));
}

/// What Kubernetes puts in every pod of a namespace with a Service named
/// `roomhub`: none of it is a setting, so none of it may stop start-up.
const KUBERNETES_SERVICE_LINKS: &[(&str, &str)] = &[
    ("ROOMHUB_PORT", "tcp://10.0.0.7:8080"),
    ("ROOMHUB_SERVICE_HOST", "10.0.0.7"),
    ("ROOMHUB_SERVICE_PORT", "8080"),
    ("ROOMHUB_SERVICE_PORT_HTTP", "8080"),
    ("ROOMHUB_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
    ("ROOMHUB_PORT_8080_TCP_ADDR", "10.0.0.7"),
    ("ROOMHUB_PORT_8080_TCP_PORT", "8080"),
    ("ROOMHUB_PORT_8080_TCP_PROTO", "tcp"),
];

#[tokio::test]
async fn kubernetes_service_links_do_not_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = roomhub(dir.path(), &["check-config"], KUBERNETES_SERVICE_LINKS);
    assert!(out.status.success(), "{}", text(&out));
    // The real server starts and serves with them set.
    let app = TestApp::spawn_with(KUBERNETES_SERVICE_LINKS).await;
    let health = reqwest::get(app.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    // A real setting next to them still counts, and is still checked.
    let mut env = KUBERNETES_SERVICE_LINKS.to_vec();
    env.push(("ROOMHUB_HISTORY__REPLAY", "7"));
    let out = roomhub(dir.path(), &["check-config"], &env);
    let s: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(s["history"]["replay"].as_integer(), Some(7));
}

#[test]
fn config_errors_say_what_is_wrong_once_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("syntax.toml"), "[server\nbind = 1\n").unwrap();
    std::fs::write(dir.path().join("section.toml"), "[histroy]\nreplay = 1\n").unwrap();
    std::fs::create_dir(dir.path().join("adir")).unwrap();
    // (arguments, environment, what the output must contain, must not contain)
    type Case<'a> = (
        Vec<&'a str>,
        Vec<(&'a str, &'a str)>,
        Vec<&'a str>,
        Vec<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec![("ROOMHUB_SERVER__BNID", "x")],
            vec![
                "server.bnid (from ROOMHUB_SERVER__BNID): unknown key",
                "did you mean `server.bind`?",
            ],
            vec!["bnid.bnid", "BNID__BNID"],
        ),
        (
            // A top-level unknown section, next to a Kubernetes variable of
            // the same name: the setting variable is the one named.
            vec![],
            vec![
                ("ROOMHUB_PORT__X", "1"),
                ("ROOMHUB_PORT", "tcp://10.0.0.7:8080"),
            ],
            vec!["port (from ROOMHUB_PORT__X): unknown key"],
            vec!["port.port", "ROOMHUB_PORT,"],
        ),
        (
            vec![],
            vec![("ROOMHUB_LIMITS__PUBLISH_PER_SECOND", "5")],
            vec!["did you mean `limits.publish_per_sec`?"],
            vec![],
        ),
        (
            vec!["--config", "section.toml"],
            vec![],
            vec!["histroy (from ", "section.toml", "did you mean `history`?"],
            vec!["histroy.histroy"],
        ),
        (
            vec!["--config", "syntax.toml"],
            vec![],
            vec!["syntax.toml: "],
            vec![" (from"],
        ),
        (
            vec![],
            vec![("ROOMHUB_STORAGE__DURABILITY", "maybe")],
            vec!["`maybe` is not one of `sync`, `batched`"],
            vec!["``"],
        ),
        (
            vec!["--config", "adir"],
            vec![],
            vec!["adir is a directory"],
            vec!["does not exist"],
        ),
    ];
    for (args, env, needles, absent) in cases {
        let mut all = vec!["check-config"];
        all.extend(&args);
        let out = roomhub(dir.path(), &all, &env);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{all:?} {env:?}: {said}");
        for needle in needles {
            assert!(
                said.contains(needle),
                "{all:?} {env:?}: {needle:?} not in {said}"
            );
        }
        for wrong in absent {
            assert!(
                !said.contains(wrong),
                "{all:?} {env:?}: {wrong:?} in {said}"
            );
        }
    }
    // Any readable file will do, even an empty device.
    let out = roomhub(dir.path(), &["check-config", "--config", "/dev/null"], &[]);
    assert!(out.status.success(), "{}", text(&out));
}
