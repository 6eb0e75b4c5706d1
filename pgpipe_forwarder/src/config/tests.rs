//! Tests of loading, precedence, validation and redaction.

use super::*;
use serde_json::{json, Value};
use std::path::PathBuf;

const DB: &str = "postgres://app:s3cret@db.example/shop";

fn no_env(_: &str) -> Option<String> {
    None
}

fn file(text: &str) -> ConfigFile {
    ConfigFile {
        name: "pgpipe.yaml".into(),
        text: text.into(),
    }
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn flag(key: &'static str, flag: &'static str, value: Value) -> FlagOverride {
    FlagOverride { key, flag, value }
}

/// A configuration that validates, to break one setting at a time.
fn valid() -> Config {
    Config {
        database_url: DB.into(),
        channels: vec!["orders".into()],
        ..Config::default()
    }
}

fn err_of(c: &Config) -> String {
    c.validate()
        .expect_err("config should be invalid")
        .to_string()
}

#[test]
fn defaults_match_the_original() {
    let c = Config::default();
    assert_eq!(c.adapters, ["stdout"]);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
    assert_eq!(c.bus.buffer_size, 1024);
    assert_eq!(c.detector.backoff_base, Duration::from_secs(5));
    assert_eq!(c.detector.backoff_cap, Duration::from_secs(60));
    assert_eq!(c.webhook.max_retries, 5);
    assert_eq!(c.webhook.timeout, Duration::from_secs(10));
    assert_eq!(c.webhook.backoff_base, Duration::from_secs(1));
    assert_eq!(c.webhook.backoff_cap, Duration::from_secs(32));
    assert_eq!(c.sse.addr, ":8080");
    assert_eq!(c.sse.cors_origins, ["*"]);
    assert_eq!(c.sse.heartbeat_interval, Duration::from_secs(15));
    assert_eq!(c.sse.read_timeout, Duration::from_secs(5));
    assert_eq!(c.sse.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.file.max_size, 100 * 1024 * 1024);
    assert_eq!(c.file.max_files, 5);
    assert_eq!(c.exec.backoff_cap, Duration::from_secs(30));
    assert_eq!(c.pg_table.table, "pgpipe_events");
    assert_eq!(c.pg_table.backoff_cap, Duration::from_secs(30));
    assert_eq!(c.websocket.ping_interval, Duration::from_secs(15));
}

#[test]
fn defaults_round_trip_through_the_tree() {
    let got = resolve(&Config::default(), None, &no_env, &[]).expect("defaults load");
    assert_eq!(got, Config::default());
}

#[test]
fn precedence_flag_over_env_over_file_over_default() {
    let f = file("detector:\n  batch_size: 10\n  max_in_flight: 20\n  poll_interval: 1s\n");
    let env = env_of(&[
        ("PGPIPE_DETECTOR_BATCH_SIZE", "30"),
        ("PGPIPE_DETECTOR_MAX_IN_FLIGHT", "40"),
    ]);
    let flags = [flag("detector.batch_size", "--batch-size", json!(50))];
    let c = resolve(&Config::default(), Some(&f), &env, &flags).expect("loads");
    assert_eq!(c.detector.batch_size, 50, "flag beats env");
    assert_eq!(c.detector.max_in_flight, 40, "env beats file");
    assert_eq!(
        c.detector.poll_interval,
        Duration::from_secs(1),
        "file beats default"
    );
    assert_eq!(
        c.detector.backoff_cap,
        Duration::from_secs(60),
        "default stays"
    );
}

#[test]
fn env_names_follow_the_original_rule() {
    assert_eq!(env_var_name("database_url"), "PGPIPE_DATABASE_URL");
    assert_eq!(env_var_name("webhook.url"), "PGPIPE_WEBHOOK_URL");
    assert_eq!(
        env_var_name("detector.poll_interval"),
        "PGPIPE_DETECTOR_POLL_INTERVAL"
    );
    assert_eq!(env_var_name("a-b.c"), "PGPIPE_A_B_C");
    let vars = env_vars();
    assert!(vars.contains(&("detector.type".into(), "PGPIPE_DETECTOR_TYPE".into())));
    assert!(vars.contains(&("sse.cors_origins".into(), "PGPIPE_SSE_CORS_ORIGINS".into())));
    assert!(!vars.iter().any(|(k, _)| k.starts_with("webhook.headers")));
    let mut names: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), vars.len(), "no two keys share an env var");
}

#[test]
fn env_values_are_typed_by_the_default() {
    let env = env_of(&[
        ("PGPIPE_DATABASE_URL", DB),
        ("PGPIPE_CHANNELS", "orders, payments,,users  x"),
        ("PGPIPE_ADAPTERS", "stdout,webhook"),
        ("PGPIPE_WEBHOOK_URL", "https://hooks.example/x"),
        ("PGPIPE_DETECTOR_TYPE", "wal"),
        ("PGPIPE_DETECTOR_PUBLICATION", "pub"),
        ("PGPIPE_DETECTOR_TX_METADATA", "true"),
        ("PGPIPE_DETECTOR_POLL_INTERVAL", "250ms"),
        ("PGPIPE_FILE_MAX_SIZE", "10MiB"),
        ("PGPIPE_SHUTDOWN_TIMEOUT", "1m 30s"),
        ("PGPIPE_METRICS_ADDR", ""),
    ]);
    let c = load(&Config::default(), None, &env, &[]).expect("loads");
    assert_eq!(c.database_url, DB);
    assert_eq!(c.channels, ["orders", "payments", "users", "x"]);
    assert_eq!(c.adapters, ["stdout", "webhook"]);
    assert_eq!(c.detector.kind, DetectorKind::Wal);
    assert!(c.detector.tx_metadata);
    assert_eq!(c.detector.poll_interval, Duration::from_millis(250));
    assert_eq!(c.file.max_size, 10 << 20);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(90));
    assert_eq!(c.metrics_addr, "", "an empty variable counts as unset");
}

#[test]
fn bad_env_values_name_the_variable() {
    let env = env_of(&[("PGPIPE_DETECTOR_BATCH_SIZE", "x")]);
    let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"PGPIPE_DETECTOR_BATCH_SIZE: invalid value "x": expected a non-negative integer"#
    );
    let env = env_of(&[("PGPIPE_DETECTOR_TX_MARKERS", "maybe")]);
    let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("PGPIPE_DETECTOR_TX_MARKERS: invalid value"),
        "{e}"
    );
    let env = env_of(&[("PGPIPE_SSE_IDLE_TIMEOUT", "soon")]);
    let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("PGPIPE_SSE_IDLE_TIMEOUT: sse.idle_timeout: "),
        "{e}"
    );
    let env = env_of(&[("PGPIPE_DETECTOR_BATCH_SIZE", "99999999999")]);
    let e = resolve(&Config::default(), None, &env, &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("PGPIPE_DETECTOR_BATCH_SIZE: detector.batch_size: "),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = resolve(
        &Config::default(),
        Some(&file("webhok:\n  url: x\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(r#"config file pgpipe.yaml: unknown key "webhok" at top level"#),
        "{e}"
    );
    let e = resolve(
        &Config::default(),
        Some(&file("detector:\n  batchsize: 1\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            r#"config file pgpipe.yaml: unknown key "batchsize" in section "detector""#
        ),
        "{msg}"
    );
    assert!(msg.contains("batch_size"), "lists the known keys: {msg}");
}

#[test]
fn deny_unknown_fields_also_guards_direct_deserialization() {
    let e = serde_json::from_value::<Config>(json!({"webhok": {}})).unwrap_err();
    assert!(e.to_string().contains("webhok"), "{e}");
}

#[test]
fn file_values_of_the_wrong_type_name_key_and_file() {
    let e = resolve(
        &Config::default(),
        Some(&file("detector:\n  batch_size: lots\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("config file pgpipe.yaml: detector.batch_size: invalid type"),
        "{e}"
    );
    let e = resolve(
        &Config::default(),
        Some(&file("webhook: 5\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "config file pgpipe.yaml: webhook: expected a section of keys, found a number"
    );
    let e = resolve(&Config::default(), Some(&file("- a\n- b\n")), &no_env, &[]).unwrap_err();
    assert!(e.to_string().contains("expected a mapping"), "{e}");
    let e = resolve(&Config::default(), Some(&file("a: [\n")), &no_env, &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("config file pgpipe.yaml: invalid YAML"),
        "{e}"
    );
    let e = resolve(
        &Config::default(),
        Some(&file("channels: [a]\nadapters: [stdout\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("line 2"), "the line is named: {e}");
}

#[test]
fn a_full_original_style_file_loads() {
    let text = r#"
database_url: postgres://localhost/app
channels: [orders, "pgpipe:users"]
adapters:
  - webhook
  - sse
  - file
shutdown_timeout: 10s
log_level: debug
bus:
  buffer_size: 64
detector:
  type: listen_notify
  backoff_base: 1s
  backoff_cap: 2s
webhook:
  url: https://hooks.example/in
  max_retries: 3
  signing_key: k
  headers:
    Authorization: Bearer t
  timeout: 2s
sse:
  addr: 127.0.0.1:9000
  cors_origins: [https://app.example]
file:
  path: /tmp/events.jsonl
  max_size: 1MiB
  max_files: 2
exec:
websocket:
  ping_interval: 5s
"#;
    let c = load(&Config::default(), Some(&file(text)), &no_env, &[]).expect("loads");
    assert_eq!(c.channels, ["orders", "pgpipe:users"]);
    assert_eq!(c.adapters, ["webhook", "sse", "file"]);
    assert_eq!(c.bus.buffer_size, 64);
    assert_eq!(c.detector.kind, DetectorKind::ListenNotify);
    assert_eq!(
        c.webhook.headers.get("Authorization").map(String::as_str),
        Some("Bearer t")
    );
    assert_eq!(c.file.max_size, 1 << 20);
    assert_eq!(c.file.path, PathBuf::from("/tmp/events.jsonl"));
    assert_eq!(
        c.exec,
        ExecConfig::default(),
        "an empty section keeps its defaults"
    );
    assert_eq!(c.log_level, LogLevel::Debug);

    let upper = "Database_URL: postgres://h/d\nChannels: [a]\nDetector:\n  Batch_Size: 3\n";
    let c = load(&Config::default(), Some(&file(upper)), &no_env, &[]).expect("loads");
    assert_eq!(
        c.detector.batch_size, 3,
        "keys are case-insensitive, as with viper"
    );
}

#[test]
fn several_webhooks_through_the_config_file() {
    let text = "database_url: postgres://h/d\nchannels: [a]\nwebhook:\n  url: http://one\n\
                    webhooks:\n  - name: billing\n    url: https://b.example/in\n    \
                    max_retries: 2\n  - name: audit\n    url: http://a.example\n";
    let c = load(&Config::default(), Some(&file(text)), &no_env, &[]).expect("loads");
    assert_eq!(
        c.webhook.url, "http://one",
        "the original key keeps working"
    );
    assert_eq!(c.webhooks.len(), 2);
    assert_eq!(
        (c.webhooks[0].name.as_str(), c.webhooks[0].max_retries),
        ("billing", 2)
    );
    assert_eq!(
        c.webhooks[1].timeout,
        WebhookConfig::default().timeout,
        "defaults fill each entry"
    );
    let dup = text.replace("name: audit", "name: billing");
    let e = load(&Config::default(), Some(&file(&dup)), &no_env, &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("webhooks[1]: name \"billing\" is used twice"),
        "{e}"
    );
    let more = format!(
        "{text}files:\n  - name: copy\n    path: /tmp/x.jsonl\n    max_size: 1MiB\n\
             execs:\n  - name: cat\n    command: cat\npg_tables:\n  - name: audit\n    \
             table: audit.events\n"
    );
    let c = load(&Config::default(), Some(&file(&more)), &no_env, &[]).expect("loads");
    assert_eq!(c.files[0].max_size, 1 << 20);
    assert_eq!(
        (c.execs[0].name.as_str(), c.pg_tables[0].batch_size),
        ("cat", 500)
    );
    let no_path = more.replace("    path: /tmp/x.jsonl\n", "");
    let e = load(&Config::default(), Some(&file(&no_path)), &no_env, &[]).unwrap_err();
    assert_eq!(e.to_string(), "files[0]: needs a path");
    let typo = text.replace("max_retries: 2", "retries: 2");
    let e = load(&Config::default(), Some(&file(&typo)), &no_env, &[]).unwrap_err();
    assert!(e.to_string().contains("retries"), "{e}");
}

#[test]
fn empty_file_means_defaults() {
    let c = resolve(&Config::default(), Some(&file("# nothing\n")), &no_env, &[]).expect("loads");
    assert_eq!(c, Config::default());
}

#[test]
fn flags_with_lists_and_durations() {
    let flags = [
        flag("channels", "--channel", json!(["a", "b"])),
        flag("detector.poll_interval", "--poll-interval", json!("2s")),
        flag("database_url", "--db", json!(DB)),
    ];
    let env = env_of(&[("PGPIPE_CHANNELS", "x")]);
    let c = load(&Config::default(), None, &env, &flags).expect("loads");
    assert_eq!(c.channels, ["a", "b"], "flag lists replace, not extend");
    assert_eq!(c.detector.poll_interval, Duration::from_secs(2));
    let bad = [flag("nope", "--nope", json!(1))];
    assert!(matches!(
        resolve(&Config::default(), None, &no_env, &bad),
        Err(ConfigError::Internal(_))
    ));
}

#[test]
fn validation_errors() {
    assert!(valid().validate().is_ok());

    let mut c = valid();
    c.database_url.clear();
    assert_eq!(
        err_of(&c),
        "no database URL: pass --db or set database_url / PGPIPE_DATABASE_URL"
    );

    let mut c = valid();
    c.database_url = "postgres://u:pw@h:notaport/db".into();
    let msg = err_of(&c);
    assert!(
        msg.starts_with("database_url: invalid connection string"),
        "{msg}"
    );
    assert!(msg.contains("port") && !msg.contains("pw"), "{msg}");
    c.database_url = "postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem".into();
    assert!(
        c.validate().is_ok(),
        "TLS parameters tokio-postgres lacks are accepted"
    );
    c.database_url = "host=h sslmode=sometimes".into();
    assert!(err_of(&c).contains("sslmode"));

    let mut c = valid();
    c.channels.clear();
    assert!(err_of(&c).starts_with("no channels"));
    c.detector.kind = DetectorKind::Wal;
    c.detector.publication = "p".into();
    assert!(c.validate().is_ok(), "wal needs no channels");

    let mut c = valid();
    c.channels.push("bad channel".into());
    assert!(err_of(&c).starts_with(r#"invalid channel name "bad channel""#));
    c.channels = vec!["x".repeat(64)];
    assert!(err_of(&c).starts_with("invalid channel name"));
    c.channels = vec!["pgpipe:orders.v1-2_x".into(), "x".repeat(63)];
    assert!(c.validate().is_ok());

    let mut c = valid();
    c.adapters = vec!["kafka".into()];
    assert_eq!(
        err_of(&c),
        r#"unknown adapter "kafka": valid adapters are stdout, webhook, sse, ws, file, exec, pg_table, nats"#
    );
    c.adapters = vec![];
    assert!(err_of(&c).starts_with("no adapters"));
    c.adapters = vec!["stdout".into(), "stdout".into()];
    assert!(err_of(&c).contains("more than once"));

    let mut c = valid();
    c.adapters = vec!["webhook".into()];
    assert!(err_of(&c).starts_with("the webhook adapter needs a URL"));
    c.webhook.url = "ftp://user:pw@x".into();
    let msg = err_of(&c);
    assert!(msg.contains("not an http"), "{msg}");
    assert!(!msg.contains("pw"), "password masked: {msg}");
    c.webhook.url = "https://hooks.example".into();
    assert!(c.validate().is_ok());
    c.webhook.headers.insert("Bad Header".into(), "v".into());
    assert!(err_of(&c).contains("invalid header"));

    let mut c = valid();
    c.adapters = vec!["file".into()];
    assert!(err_of(&c).starts_with("the file adapter needs a path"));

    let mut c = valid();
    c.adapters = vec!["exec".into()];
    assert!(err_of(&c).starts_with("the exec adapter needs a command"));

    let mut c = valid();
    c.detector.kind = DetectorKind::Wal;
    assert!(err_of(&c).starts_with("the wal detector needs a publication"));
    c.detector.all_tables = true;
    assert!(
        c.validate().is_ok(),
        "all_tables stands in for a publication"
    );

    type Set = fn(&mut Config);
    let wal_only: [(Set, &str); 5] = [
        (|c| c.detector.tx_metadata = true, "tx_metadata"),
        (|c| c.detector.tx_markers = true, "tx_markers"),
        (|c| c.detector.publication = "p".into(), "publication"),
        (|c| c.detector.all_tables = true, "all_tables"),
        (|c| c.detector.slot = "s".into(), "slot"),
    ];
    for (set, name) in wal_only {
        let mut c = valid();
        set(&mut c);
        let msg = err_of(&c);
        assert!(
            msg.contains(name) && msg.contains("only works with the wal detector"),
            "{msg}"
        );
    }

    let e = load(
        &Config::default(),
        Some(&file("detector:\n  type: kafka\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string().ends_with(
            r#"detector.type: unknown detector "kafka": valid detectors are queue, listen_notify, wal (or empty to pick automatically)"#
        ),
        "{e}"
    );

    let mut c = valid();
    c.detector.kind = DetectorKind::Wal;
    c.detector.publication = "p".into();
    c.detector.slot = "Bad-Slot".into();
    assert!(err_of(&c).contains("invalid replication slot name"));

    let mut c = valid();
    c.detector.batch_size = 0;
    assert_eq!(err_of(&c), "detector.batch_size must be at least 1, got 0");
    let mut c = valid();
    c.detector.max_in_flight = 0;
    assert!(err_of(&c).starts_with("detector.max_in_flight must be at least 1"));
    let mut c = valid();
    c.bus.buffer_size = 0;
    assert!(err_of(&c).starts_with("bus.buffer_size must be at least 1"));
    let mut c = valid();
    c.websocket.client_buffer = 0;
    assert!(err_of(&c).starts_with("websocket.client_buffer must be at least 1"));
    let mut c = valid();
    c.webhook.max_retries = 0;
    assert!(err_of(&c).starts_with("webhook.max_retries must be at least 1"));

    let mut c = valid();
    c.detector.poll_interval = Duration::ZERO;
    assert_eq!(err_of(&c), "detector.poll_interval must be longer than 0");

    let mut c = valid();
    c.webhook.backoff_base = Duration::from_secs(60);
    assert!(err_of(&c).starts_with("webhook.backoff_base (60s) must not exceed"));

    let mut c = valid();
    c.sse.addr = "example.com:80".into();
    assert!(err_of(&c).starts_with("sse.addr: invalid listen address"));

    // A value outside the set cannot be represented; loading rejects it, naming the key.
    let e = load(
        &Config::default(),
        Some(&file("log_level: loud\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("log_level: unknown variant `loud`"),
        "{e}"
    );
}

#[test]
fn negative_sizes_are_rejected_when_loading() {
    let e = load(
        &Config::default(),
        Some(&file("bus:\n  buffer_size: -1\n")),
        &no_env,
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("config file pgpipe.yaml: bus.buffer_size: "),
        "{e}"
    );
    let env = env_of(&[("PGPIPE_BUS_BUFFER_SIZE", "-1")]);
    let e = load(&Config::default(), None, &env, &[]).unwrap_err();
    assert!(e.to_string().contains("non-negative"), "{e}");
}

#[test]
fn secrets_never_show_in_debug() {
    let mut c = valid();
    c.webhook.signing_key = "hmac-key-123".into();
    c.webhook
        .headers
        .insert("Authorization".into(), "Bearer tok-456".into());
    c.pg_table.url = "host=h password='p w 789' dbname=x".into();
    for text in [
        format!("{c:?}"),
        format!("{c:#?}"),
        format!("{:?}", c.redacted()),
    ] {
        for secret in ["s3cret", "hmac-key-123", "tok-456", "789"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(text.contains("app:***@db.example"), "{text}");
        assert!(text.contains("Authorization"), "{text}");
    }
    assert_eq!(c.redacted().channels, c.channels);
}

#[test]
fn redact_url_forms() {
    assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
    assert_eq!(
        redact_url("postgres://u:p@ss@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(
        redact_url("postgresql://h/db?user=u&password=p&sslmode=require"),
        "postgresql://h/db?user=u&password=***&sslmode=require"
    );
    assert_eq!(
        redact_url("host=h password=secret user=u"),
        "host=h password=*** user=u"
    );
    assert_eq!(
        redact_url("host=h password = 'p \\' w' user=u"),
        "host=h password =*** user=u"
    );
    assert_eq!(redact_url(""), "");
    // Webhook URLs: the whole userinfo and every query value.
    assert_eq!(
        redact_url("https://user:pw@hooks.example/in?api_key=k1&x=2"),
        "https://***@hooks.example/in?api_key=***&x=***"
    );
    assert_eq!(
        redact_url("https://tok@hooks.example/a@b?t"),
        "https://***@hooks.example/a@b?t"
    );
    assert_eq!(redact_url("http://h:8080/hook"), "http://h:8080/hook");
    // Postgres: unknown parameters are masked too.
    assert_eq!(
        redact_url("postgres://u@h/db?sslpassword=x&sslmode=verify-full"),
        "postgres://u@h/db?sslpassword=***&sslmode=verify-full"
    );
}

#[test]
fn sizes() {
    assert_eq!(parse_size("100"), Ok(100));
    assert_eq!(parse_size("100MiB"), Ok(100 << 20));
    assert_eq!(parse_size("100 mb"), Ok(100_000_000));
    assert_eq!(parse_size("1.5G"), Ok(3 << 29));
    assert_eq!(parse_size("2k"), Ok(2048));
    assert!(parse_size("MiB").is_err());
    assert!(parse_size("10 parsecs").is_err());
    assert!(parse_size("99999999999999T").is_err());
    let c: FileConfig = serde_json::from_value(json!({"max_size": "1KiB"})).expect("size");
    assert_eq!(c.max_size, 1024);
}

#[test]
fn listen_addresses() {
    assert_eq!(
        parse_listen_addr(":8080"),
        Ok("0.0.0.0:8080".parse().unwrap())
    );
    assert_eq!(
        parse_listen_addr("localhost:1"),
        Ok("127.0.0.1:1".parse().unwrap())
    );
    assert_eq!(parse_listen_addr("[::1]:9"), Ok("[::1]:9".parse().unwrap()));
    assert!(parse_listen_addr(":http").is_err());
    assert!(parse_listen_addr("host:80").is_err());
}

#[test]
fn a_secret_cannot_be_printed() {
    let key = Secret::from("hunter2");
    assert_eq!(format!("{key:?}"), "***");
    assert_eq!(format!("{:?}", Secret::default()), "\"\"");
    assert_eq!(key.expose(), "hunter2");
    let mut c = Config::default();
    c.webhook.signing_key = key;
    c.sse.auth_token = "t0ken".into();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("t0ken"),
        "{shown}"
    );
}
