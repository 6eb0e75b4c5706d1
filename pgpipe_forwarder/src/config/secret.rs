//! Secrets: a [`Secret`] type that cannot be printed, redacting `Debug` output and
//! [`Config::redacted`].

use super::*;

/// A secret setting (a signing key, a bearer token): `Debug` shows `***` (or nothing when
/// unset) and there is no `Display`, so it cannot end up in a log line by accident; read
/// it with [`Secret::expose`]. It serializes as its value, for the config tree's round
/// trip; [`Config::redacted`] masks it for showing.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for the code that uses it (never for logs).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is unset.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The masked form shown by `pgpipe config` and `Config::redacted`.
    pub fn redacted(&self) -> Secret {
        if self.is_empty() {
            Secret::default()
        } else {
            Secret(REDACTED.into())
        }
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { REDACTED })
    }
}

impl Config {
    /// A copy with every secret masked (URL passwords, signing key, header values), for logs.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.database_url = redact_url(&c.database_url);
        c.sse.auth_token = c.sse.auth_token.redacted();
        crate::adapter::registry::redact(&mut c);
        c
    }

    /// Whether `name` is among the configured adapters.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a == name)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("channels", &self.channels)
            .field("adapters", &self.adapters)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_level", &self.log_level)
            .field("log_format", &self.log_format)
            .field("detector", &self.detector)
            .field("bus", &self.bus)
            .field("webhook", &self.webhook)
            .field("sse", &self.sse)
            .field("file", &self.file)
            .field("exec", &self.exec)
            .field("pg_table", &self.pg_table)
            .field("nats", &self.nats)
            .field("websocket", &self.websocket)
            .field("webhooks", &self.webhooks)
            .field("files", &self.files)
            .field("execs", &self.execs)
            .field("pg_tables", &self.pg_tables)
            .field("natss", &self.natss)
            .finish()
    }
}

/// A URL as logs, health, metrics and dead letters may show it: the secrets a URL can
/// carry are masked. Postgres URLs keep their user (`postgres://u:***@h/db`) and the query
/// keys libpq documents as harmless (`sslmode`, `application_name`, ...); every other URL
/// (webhooks: `https://***@h/hook?api_key=***`) loses its whole userinfo and every query
/// value. A key/value connection string gets `password=***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_conninfo(url);
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let postgres = matches!(scheme, "postgres://" | "postgresql://");
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    // The userinfo ends at the last '@' of the authority (an unencoded '@' in a password
    // is common enough); the authority ends at the first '/'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match (postgres, userinfo.find(':')) {
                (true, Some(colon)) => format!("{}:{REDACTED}{host}", &userinfo[..colon]),
                (true, None) => authority.to_owned(),
                (false, _) => format!("{REDACTED}{host}"),
            }
        }
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}{authority}{path}");
    if let Some(query) = query {
        let shown: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if postgres && HARMLESS_POSTGRES_PARAMETERS.contains(&k) => {
                    format!("{k}={v}")
                }
                Some((k, _)) => format!("{k}={REDACTED}"),
                None => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&shown.join("&"));
    }
    out
}

/// Postgres URL parameters shown as they are by [`redact_url`].
const HARMLESS_POSTGRES_PARAMETERS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "sslmode",
    "sslrootcert",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
];

/// Masks `password=...` in a libpq key/value connection string (values may be quoted).
fn redact_conninfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = find_password_key(rest) {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let eq = after.find('=').map_or(after.len(), |i| i + 1);
        out.push_str(&after[..eq]);
        out.push_str(REDACTED);
        let value = after[eq..].trim_start();
        rest = skip_conninfo_value(value);
    }
    out.push_str(rest);
    out
}

/// Byte offset of a `password` key (at a word start, followed by optional spaces and `=`).
fn find_password_key(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find("password") {
        let start = from + i;
        let at_word_start = start == 0 || lower.as_bytes()[start - 1].is_ascii_whitespace();
        let after = lower[start + "password".len()..].trim_start();
        if at_word_start && after.starts_with('=') {
            return Some(start);
        }
        from = start + 1;
    }
    None
}

/// The text after a conninfo value: a quoted value ends at its closing quote, else at space.
fn skip_conninfo_value(value: &str) -> &str {
    if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '\'' if !escaped => return &quoted[i + 1..],
                _ => escaped = false,
            }
        }
        ""
    } else {
        let end = value.find(char::is_whitespace).unwrap_or(value.len());
        &value[end..]
    }
}
