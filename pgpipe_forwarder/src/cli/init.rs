//! `pgpipe init`: prints the SQL that sets a table up for capture.
//!
//! Names are taken as written (case kept) and quoted in the SQL printed: identifiers with
//! `quote_ident` rules (double quotes when not a plain lower-case name or a keyword),
//! literals with doubled single quotes. Every name Postgres accepts can be given: a part
//! with a `.` or `"` in it is written in double quotes, as in SQL.

use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::Args;

use super::{print_output, GlobalArgs, Run};
use crate::config::valid_channel;

/// Longest Postgres identifier (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// Shown after `pgpipe init --help`.
const AFTER_HELP: &str = "\
Names are taken literally: --table Orders means the table \"Orders\", not orders, and
--table 'Order Items' the table \"Order Items\". A name with a '.' or '\"' in it is
written in double quotes, as in SQL: --table '\"my.schema\".\"Order \"\"A\"\"\"'.

Examples:
  pgpipe init --table orders | psql \"$DATABASE_URL\"
  pgpipe init --table shop.orders --channel orders:v1
  pgpipe init --table orders --detector wal --publication pgpipe_orders";

/// Arguments of `pgpipe init`.
#[derive(Debug, Args)]
#[command(
    after_help = AFTER_HELP,
    long_about = "Print the SQL that sets a table up for capture, to run with psql.\n\n\
        --detector queue (default): install the pgpipe extension and subscribe the table; \
        its changes are captured by a trigger into the extension's queue.\n\
        --detector listen_notify: a trigger that pg_notify's each change on channel pgpipe:<table> \
        (rows that would exceed NOTIFY's 8000-byte limit are sent as their primary key, \
        flagged \"truncated\": true).\n\
        --detector wal: create the publication that `pgpipe listen --detector wal` replicates."
)]
pub struct InitArgs {
    /// Table to capture, optionally schema-qualified (schema.table), case kept; a part with
    /// `.` or `"` in double quotes (not needed with --adapter)
    #[arg(
        long,
        value_name = "TABLE",
        default_value = "",
        hide_default_value = true
    )]
    table: String,

    /// Channel the table's events are published on [default: the table name, or
    /// pgpipe:<table> with --detector listen_notify]; letters,
    /// digits and `_ . : -`, at most 63 characters
    #[arg(long, value_name = "NAME")]
    channel: Option<String>,

    /// Detector the SQL is for
    #[arg(long, value_name = "TYPE", value_parser = ["queue", "listen_notify", "wal"], default_value = "queue")]
    detector: String,

    /// Print the target table of an adapter instead (pg_table: the events table)
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(crate::adapter::registry::with_init()))]
    adapter: Option<String>,

    /// With --adapter pg_table: the table to create, optionally schema-qualified
    /// [default: pgpipe_events]
    #[arg(long, value_name = "TABLE", requires = "adapter")]
    pg_table_name: Option<String>,

    /// Publication to create with --detector wal [default: pgpipe_<table>]
    #[arg(long, value_name = "NAME")]
    publication: Option<String>,
}

impl Run for InitArgs {
    fn run(self, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
        print_output(&self.sql()?)?;
        Ok(ExitCode::SUCCESS)
    }
}

impl InitArgs {
    /// The SQL to print, or why there is none.
    fn sql(&self) -> anyhow::Result<String> {
        if let Some(adapter) = &self.adapter {
            let init = crate::adapter::registry::kind(adapter).and_then(|k| k.init);
            let Some(init) = init else {
                bail!("`pgpipe init --adapter {adapter}` is not available");
            };
            let table = parse_table(self.pg_table_name.as_deref().unwrap_or("pgpipe_events"))?;
            return Ok(init(&qualified(&table)));
        }
        if self.table.is_empty() {
            bail!("pass --table TABLE (the table to capture), or --adapter pg_table");
        }
        let table = parse_table(&self.table)?;
        match self.detector.as_str() {
            // The extension names the channel after the table (schema.table outside
            // public): say so now when that is no valid channel.
            "queue" if self.channel.is_none() && !valid_channel(&table.join(".")) => {
                let name = table.last().expect("a table name");
                let suggestion: String = name
                    .chars()
                    .map(|c| {
                        if valid_channel(&c.to_string()) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .take(63)
                    .collect();
                bail!(
                    "the default channel {:?} (the table's name) is not a valid channel name: pass \
                     --channel NAME, e.g. --channel {suggestion}",
                    table.join(".")
                )
            }
            "queue" => {
                if self.publication.is_some() {
                    bail!("--publication only applies to --detector wal");
                }
                // regclass input syntax inside a literal: '"Orders"' keeps the case.
                let mut args = quote_literal(&qualified(&table));
                if let Some(channel) = &self.channel {
                    if !valid_channel(channel) {
                        bail!(
                            "invalid channel name {channel:?}: use 1 to 63 characters of letters, \
                             digits, '_', '.', ':' and '-'"
                        );
                    }
                    args.push_str(", ");
                    args.push_str(&quote_literal(channel));
                }
                Ok(format!(
                    "CREATE EXTENSION IF NOT EXISTS pgpipe;\nSELECT pgpipe.subscribe({args});\n"
                ))
            }
            "wal" => {
                if self.channel.is_some() {
                    bail!("--channel does not apply to --detector wal (events are named after their table)");
                }
                let publication = match &self.publication {
                    Some(p) if valid_identifier(p) => p.clone(),
                    Some(p) => bail!(
                        "invalid publication name {p:?}: use a letter or '_' followed by letters, \
                         digits, '_' or '$', at most {MAX_IDENTIFIER_LEN} characters"
                    ),
                    None => default_publication(&table),
                };
                Ok(format!(
                    "CREATE PUBLICATION {} FOR TABLE {};\n",
                    quote_ident(&publication),
                    qualified(&table)
                ))
            }
            "listen_notify" => {
                if self.publication.is_some() {
                    bail!("--publication only applies to --detector wal");
                }
                let channel = match &self.channel {
                    Some(c) if valid_channel(c) => c.clone(),
                    Some(c) => bail!(
                        "invalid channel name {c:?}: use 1 to 63 characters of letters, \
                         digits, '_', '.', ':' and '-'"
                    ),
                    None => {
                        let name = format!("pgpipe:{}", table.last().expect("a table name"));
                        if !valid_channel(&name) {
                            bail!("the default channel {name:?} is not a valid channel name: pass --channel");
                        }
                        name
                    }
                };
                Ok(notify_trigger_sql(&table, &channel))
            }
            other => bail!("`pgpipe init --detector {other}` is not available yet"),
        }
    }
}

/// The table the pg_table adapter inserts into: the event envelope's six columns, keyed
/// by the event id so a redelivered event is skipped (`ON CONFLICT (id) DO NOTHING`).
/// NOTIFY refuses payloads of 8000 bytes or more (the default build's limit).
const NOTIFY_MAX_PAYLOAD: usize = 8000;

/// The trigger function and triggers for `--detector listen_notify`: each row change is
/// sent with `pg_notify` as `{op, schema, table, row, old}` (rows as `to_jsonb` gives
/// them). A payload that would reach NOTIFY's 8000-byte limit (which would abort the
/// writer's transaction) is replaced by the primary-key columns of `row`/`old` with
/// `"truncated": true`, and by `row: null` when even that is too large or there is no
/// primary key; a receiver then reads the row itself. TRUNCATE is notified too.
fn notify_trigger_sql(table: &[String], channel: &str) -> String {
    let name = table.last().expect("a table name");
    let mut function_name = format!("pgpipe_notify_{name}");
    while function_name.len() > MAX_IDENTIFIER_LEN {
        function_name.pop();
    }
    let mut function = table[..table.len() - 1].to_vec();
    function.push(function_name);
    let function = qualified(&function);
    let target = qualified(table);
    let channel = quote_literal(channel);
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $pgpipe$
DECLARE
    new_row jsonb;
    old_row jsonb;
    key_cols text[];
    payload text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        new_row := to_jsonb(OLD);
    ELSIF TG_OP = 'UPDATE' THEN
        new_row := to_jsonb(NEW);
        old_row := to_jsonb(OLD);
    ELSIF TG_OP = 'INSERT' THEN
        new_row := to_jsonb(NEW);
    END IF;
    payload := json_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                 'row', new_row, 'old', old_row)::text;
    IF octet_length(payload) >= {limit} THEN
        -- Too large for NOTIFY: send the primary key only, flagged as truncated.
        SELECT array_agg(a.attname::text) INTO key_cols
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = TG_RELID AND i.indisprimary;
        payload := json_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
            'row', (SELECT jsonb_object_agg(k, new_row -> k) FROM unnest(key_cols) AS k),
            'old', (SELECT jsonb_object_agg(k, old_row -> k) FROM unnest(key_cols) AS k
                     WHERE old_row IS NOT NULL),
            'truncated', true)::text;
        IF octet_length(payload) >= {limit} THEN
            payload := json_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA,
                'table', TG_TABLE_NAME, 'row', NULL, 'old', NULL, 'truncated', true)::text;
        END IF;
    END IF;
    PERFORM pg_notify({channel}, payload);
    RETURN NULL;
END
$pgpipe$;
DROP TRIGGER IF EXISTS pgpipe_notify ON {target};
CREATE TRIGGER pgpipe_notify AFTER INSERT OR UPDATE OR DELETE ON {target}
    FOR EACH ROW EXECUTE FUNCTION {function}();
DROP TRIGGER IF EXISTS pgpipe_notify_truncate ON {target};
CREATE TRIGGER pgpipe_notify_truncate AFTER TRUNCATE ON {target}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
",
        limit = NOTIFY_MAX_PAYLOAD,
    )
}

/// Splits `schema.table` (or `table`) into its names, as written and case kept: a part in
/// double quotes may hold anything (`""` is one `"`), an unquoted one anything but `.` and
/// `"`. Refused: an empty part, more than two, an unclosed quote, NUL, over 63 bytes.
fn parse_table(table: &str) -> anyhow::Result<Vec<String>> {
    let refuse = |why: &str| {
        anyhow!(
            "invalid table name {table:?}: {why}; write table or schema.table, a part with '.' \
             or '\"' in double quotes ('\"' doubled), at most {MAX_IDENTIFIER_LEN} bytes each"
        )
    };
    let mut parts = Vec::new();
    let mut chars = table.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    None => return Err(refuse("a double quote is not closed")),
                    Some('"') if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|&c| c != '.') {
                if c == '"' {
                    return Err(refuse("a double quote inside an unquoted name"));
                }
                part.push(c);
            }
        }
        if part.is_empty() {
            return Err(refuse("an empty name"));
        }
        if part.contains('\0') {
            return Err(refuse("a NUL character"));
        }
        if part.len() > MAX_IDENTIFIER_LEN {
            return Err(refuse("a name longer than Postgres keeps"));
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(_) => return Err(refuse("text after a closing double quote")),
        }
    }
    if parts.len() > 2 {
        return Err(refuse("more parts than schema and table"));
    }
    Ok(parts)
}

/// `[A-Za-z_][A-Za-z0-9_$]*`, at most 63 bytes.
fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_IDENTIFIER_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// `pgpipe_<schema>_<table>`, lower-cased, cut to 63 bytes (at a character's boundary).
fn default_publication(table: &[String]) -> String {
    let mut name = format!("pgpipe_{}", table.join("_")).to_ascii_lowercase();
    while name.len() > MAX_IDENTIFIER_LEN {
        name.pop();
    }
    name
}

/// `schema.table` with each part quoted as needed.
fn qualified(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(".")
}

/// An SQL string literal: single quotes doubled.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An identifier as Postgres' `quote_ident` writes it: bare when it is a lower-case name
/// that is not a keyword, double-quoted (inner quotes doubled) otherwise.
fn quote_ident(s: &str) -> String {
    let mut chars = s.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && NON_BARE_KEYWORDS.binary_search(&s).is_err();
    if plain {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// Postgres keywords that are not "unreserved" (reserved, type/function-name and
/// column-name keywords): `quote_ident` quotes these. Sorted for binary search.
#[rustfmt::skip]
const NON_BARE_KEYWORDS: &[&str] = &[
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric",
    "authorization", "between", "bigint", "binary", "bit", "boolean", "both", "case", "cast",
    "char", "character", "check", "coalesce", "collate", "collation", "column", "concurrently",
    "constraint", "create", "cross", "current_catalog", "current_date", "current_role",
    "current_schema", "current_time", "current_timestamp", "current_user", "dec", "decimal",
    "default", "deferrable", "desc", "distinct", "do", "else", "end", "except", "exists",
    "extract", "false", "fetch", "float", "for", "foreign", "freeze", "from", "full", "grant",
    "graph_table", "greatest", "group", "grouping", "having", "ilike", "in", "initially",
    "inner", "inout", "int", "integer", "intersect", "interval", "into", "is", "isnull", "join",
    "json", "json_array", "json_arrayagg", "json_exists", "json_object", "json_objectagg",
    "json_query", "json_scalar", "json_serialize", "json_table", "json_value", "lateral",
    "leading", "least", "left", "like", "limit", "localtime", "localtimestamp", "merge_action",
    "national", "natural", "nchar", "none", "normalize", "not", "notnull", "null", "nullif",
    "numeric", "offset", "on", "only", "or", "order", "out", "outer", "overlaps", "overlay",
    "placing", "position", "precision", "primary", "real", "references", "returning", "right",
    "row", "select", "session_user", "setof", "similar", "smallint", "some", "substring",
    "symmetric", "system_user", "table", "tablesample", "then", "time", "timestamp", "to",
    "trailing", "treat", "trim", "true", "union", "unique", "user", "using", "values",
    "varchar", "variadic", "verbose", "when", "where", "window", "with", "xmlattributes",
    "xmlconcat", "xmlelement", "xmlexists", "xmlforest", "xmlnamespaces", "xmlparse", "xmlpi",
    "xmlroot", "xmlserialize", "xmltable",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn init(table: &str) -> InitArgs {
        InitArgs {
            table: table.into(),
            channel: None,
            detector: "queue".into(),
            adapter: None,
            pg_table_name: None,
            publication: None,
        }
    }

    fn err(args: &InitArgs) -> String {
        args.sql().expect_err("should fail").to_string()
    }

    #[test]
    fn keywords_are_sorted() {
        assert!(NON_BARE_KEYWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn queue_sql() {
        assert_eq!(
            init("orders").sql().unwrap(),
            "CREATE EXTENSION IF NOT EXISTS pgpipe;\nSELECT pgpipe.subscribe('orders');\n"
        );
        let mut a = init("shop.orders");
        a.channel = Some("orders:v1.x-y".into());
        assert_eq!(
            a.sql().unwrap(),
            "CREATE EXTENSION IF NOT EXISTS pgpipe;\n\
             SELECT pgpipe.subscribe('shop.orders', 'orders:v1.x-y');\n"
        );
    }

    #[test]
    fn odd_names_are_quoted() {
        assert!(init("Orders")
            .sql()
            .unwrap()
            .contains("subscribe('\"Orders\"')"));
        assert!(init("order")
            .sql()
            .unwrap()
            .contains("subscribe('\"order\"')"));
        let mut a = init("My.t$1");
        a.channel = Some("t".into());
        assert!(a
            .sql()
            .unwrap()
            .contains("subscribe('\"My\".\"t$1\"', 't')"));
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("users"), "users");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            quote_literal("'; DROP TABLE x; --"),
            "'''; DROP TABLE x; --'"
        );
    }

    #[test]
    fn every_name_postgres_accepts_is_quoted() {
        for (name, subscribed) in [
            ("1abc", "'\"1abc\"'"),
            ("a-b", "'\"a-b\"'"),
            ("Order Items", "'\"Order Items\"'"),
            ("x'y", "'\"x''y\"'"),
            ("\"a\"", "'a'"),
            (
                "\"my.schema\".\"Order \"\"A\"\"\"",
                "'\"my.schema\".\"Order \"\"A\"\"\"'",
            ),
            ("Shop.\"x.y\"", "'\"Shop\".\"x.y\"'"),
            ("café", "'\"café\"'"),
            ("orders; DROP TABLE x", "'\"orders; DROP TABLE x\"'"),
        ] {
            let mut a = init(name);
            a.channel = Some("c".into());
            let sql = a.sql().unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert!(
                sql.contains(&format!("SELECT pgpipe.subscribe({subscribed}, 'c');")),
                "{name:?}: {sql}"
            );
        }
        let mut a = init("my-shop.Order Items");
        a.detector = "wal".into();
        assert_eq!(
            a.sql().unwrap(),
            "CREATE PUBLICATION \"pgpipe_my-shop_order items\" FOR TABLE \"my-shop\".\"Order Items\";\n"
        );
        let mut a = init(&"é".repeat(30));
        a.detector = "wal".into();
        assert!(
            a.sql().is_ok(),
            "the default publication is cut at a character"
        );
    }

    #[test]
    fn a_table_name_that_is_no_channel_asks_for_channel() {
        let e = err(&init("Order Items"));
        assert!(
            e.contains("pass --channel NAME, e.g. --channel Order_Items"),
            "{e}"
        );
        let mut a = init("Order Items");
        a.channel = Some("items".into());
        assert!(a.sql().is_ok());
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "a.b.c",
            "a.",
            ".a",
            "",
            "\"a",
            "\"a\"b",
            "a\"b",
            "\"\"",
            "a\0b",
            &"x".repeat(64),
        ] {
            let mut a = init(bad);
            a.adapter = Some("pg_table".into());
            a.pg_table_name = Some(bad.into());
            assert!(err(&a).starts_with("invalid table name"), "{bad:?}");
            if !bad.is_empty() {
                assert!(err(&init(bad)).starts_with("invalid table name"), "{bad:?}");
            }
        }
        let mut a = init("orders");
        a.channel = Some("bad channel'".into());
        assert!(err(&a).starts_with("invalid channel name"));
    }

    #[test]
    fn wal_sql() {
        let mut a = init("orders");
        a.detector = "wal".into();
        assert_eq!(
            a.sql().unwrap(),
            "CREATE PUBLICATION pgpipe_orders FOR TABLE orders;\n"
        );
        let mut a = init("Shop.Order");
        a.detector = "wal".into();
        a.publication = Some("Pub".into());
        assert_eq!(
            a.sql().unwrap(),
            "CREATE PUBLICATION \"Pub\" FOR TABLE \"Shop\".\"Order\";\n"
        );
        a.publication = Some("p;drop".into());
        assert!(err(&a).starts_with("invalid publication name"));
        let mut a = init("public.table");
        a.detector = "wal".into();
        assert_eq!(
            a.sql().unwrap(),
            "CREATE PUBLICATION pgpipe_public_table FOR TABLE public.\"table\";\n"
        );
        a.channel = Some("c".into());
        assert!(err(&a).contains("--channel does not apply"));
    }

    #[test]
    fn unfinished_modes_say_so() {
        let mut a = init("orders");
        a.detector = "listen_notify".into();
        assert!(a
            .sql()
            .unwrap()
            .contains("pg_notify('pgpipe:orders', payload)"));
        let mut a = init("");
        a.adapter = Some("pg_table".into());
        let ddl = a.sql().unwrap();
        assert!(
            ddl.starts_with("CREATE TABLE IF NOT EXISTS pgpipe_events (\n    id         uuid        PRIMARY KEY,"),
            "{ddl}"
        );
        a.pg_table_name = Some("audit.Events".into());
        assert!(a.sql().unwrap().contains("audit.\"Events\" ("));
        a.pg_table_name = Some("a.b.c".into());
        assert!(err(&a).starts_with("invalid table name"));
        assert!(err(&init("")).contains("pass --table"));
        let mut a = init("orders");
        a.publication = Some("p".into());
        assert!(err(&a).contains("only applies to --detector wal"));
    }

    #[test]
    fn listen_notify_sql() {
        let mut a = init("shop.Order");
        a.detector = "listen_notify".into();
        let sql = a.sql().unwrap();
        assert!(
            sql.starts_with(
                "CREATE OR REPLACE FUNCTION shop.\"pgpipe_notify_Order\"() RETURNS trigger"
            ),
            "{sql}"
        );
        assert!(sql.contains("pg_notify('pgpipe:Order', payload)"), "{sql}");
        assert!(sql.contains("ON shop.\"Order\""), "{sql}");
        assert!(sql.contains("octet_length(payload) >= 8000"), "{sql}");
        a.channel = Some("it's".into());
        assert!(err(&a).starts_with("invalid channel name"));
        a.channel = Some("orders:v1".into());
        assert!(a.sql().unwrap().contains("pg_notify('orders:v1', payload)"));
        a.publication = Some("p".into());
        assert!(err(&a).contains("only applies to --detector wal"));
        let mut a = init(&format!("t{}", "x".repeat(62)));
        a.detector = "listen_notify".into();
        assert!(
            err(&a).contains("pass --channel"),
            "pgpipe:<63 chars> is too long"
        );
        a.channel = Some("c".into());
        let sql = a.sql().unwrap();
        let name = sql.split_whitespace().nth(4).unwrap();
        assert_eq!(name.len(), 63 + 2, "quoted, cut to 63: {name}");
    }
}
