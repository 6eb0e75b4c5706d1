//! Loading: defaults < file < environment < flags, merged as JSON trees (see the module
//! documentation of [`super`]).

use super::*;

use serde_json::{Map, Value};

/// A config file's name (for messages) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// The path as given, used in error messages.
    pub name: String,
    /// The YAML text.
    pub text: String,
}

impl ConfigFile {
    /// Reads the file at `path`; a missing file is an error.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(ConfigFile { name, text }),
            Err(source) => Err(ConfigError::ReadFile { path: name, source }),
        }
    }

    /// The explicit `--config` file (must exist), else `./pgpipe.yaml` when it exists, else none.
    pub fn discover(explicit: Option<&Path>) -> Result<Option<ConfigFile>, ConfigError> {
        match explicit {
            Some(path) => ConfigFile::read(path).map(Some),
            None => {
                let path = Path::new(DEFAULT_CONFIG_FILE);
                match std::fs::read_to_string(path) {
                    Ok(text) => Ok(Some(ConfigFile {
                        name: DEFAULT_CONFIG_FILE.to_owned(),
                        text,
                    })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ConfigError::ReadFile {
                        path: DEFAULT_CONFIG_FILE.to_owned(),
                        source,
                    }),
                }
            }
        }
    }
}

/// One command-line flag that was given: the key it sets and its typed value.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagOverride {
    /// Dotted config key, e.g. `detector.batch_size`.
    pub key: &'static str,
    /// The flag as typed, e.g. `--batch-size`, for messages.
    pub flag: &'static str,
    /// The value, shaped as the key's JSON form (durations as humantime strings).
    pub value: Value,
}

/// Adds an override of `key` by `flag` when the flag was given (`value` is `Some`).
pub fn override_with(
    out: &mut Vec<FlagOverride>,
    key: &'static str,
    flag: &'static str,
    value: Option<impl Into<Value>>,
) {
    if let Some(value) = value {
        out.push(FlagOverride {
            key,
            flag,
            value: value.into(),
        });
    }
}

/// The environment of the running process, for [`load`]'s `env` argument.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The environment variable that sets a dotted key: `detector.poll_interval` →
/// `PGPIPE_DETECTOR_POLL_INTERVAL`.
pub fn env_var_name(key: &str) -> String {
    let mut name = String::from(ENV_PREFIX);
    name.extend(key.chars().map(|c| match c {
        '.' | '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    name
}

/// Every leaf key of the configuration with its environment variable, in tree order.
#[cfg(test)]
pub fn env_vars() -> Vec<(String, String)> {
    let Ok(tree) = serde_json::to_value(Config::default()) else {
        return Vec::new();
    };
    let mut leaves = Vec::new();
    collect_leaves(&tree, "", &mut leaves);
    leaves
        .into_iter()
        .filter(|(key, _)| !is_map_key(key))
        .map(|(key, _)| {
            let var = env_var_name(&key);
            (key, var)
        })
        .collect()
}

/// Builds the configuration from `defaults` < `file` < `env` < `flags`, then validates it.
///
/// `env` looks a variable up by name (pass [`process_env`] for the real environment); an
/// empty value counts as unset, as it did in the original.
pub fn load(
    defaults: &Config,
    file: Option<&ConfigFile>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagOverride],
) -> Result<Config, ConfigError> {
    let config = resolve(defaults, file, env, flags)?;
    config.validate()?;
    Ok(config)
}

/// Like [`load`] without validation: merges the sources and deserializes the result.
pub fn resolve(
    defaults: &Config,
    file: Option<&ConfigFile>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagOverride],
) -> Result<Config, ConfigError> {
    let mut tree = serde_json::to_value(defaults)
        .map_err(|e| ConfigError::Internal(format!("serialize defaults: {e}")))?;
    let mut leaves = Vec::new();
    collect_leaves(&tree, "", &mut leaves);
    let mut origins: HashMap<String, Origin> = HashMap::new();

    if let Some(file) = file {
        let origin = Origin::File(file.name.clone());
        let parsed = parse_yaml(file)?;
        if let Value::Object(map) = parsed {
            merge_file(&mut tree, map, "", &origin, &mut origins)?;
        }
    }

    for (key, default) in &leaves {
        if is_map_key(key) {
            continue;
        }
        let var = env_var_name(key);
        let Some(raw) = env(&var) else { continue };
        if raw.is_empty() {
            continue;
        }
        let value = env_value(key, default, &var, &raw)?;
        set_path(&mut tree, key, value);
        origins.insert(key.clone(), Origin::Env(var));
    }

    for flag in flags {
        if !leaves.iter().any(|(key, _)| key == flag.key) {
            return Err(ConfigError::Internal(format!(
                "flag {} sets unknown key {:?}",
                flag.flag, flag.key
            )));
        }
        set_path(&mut tree, flag.key, flag.value.clone());
        origins.insert(flag.key.to_owned(), Origin::Flag(flag.flag.to_owned()));
    }

    serde_path_to_error::deserialize::<_, Config>(tree).map_err(|e| {
        let (key, lookup) = error_key(e.path());
        let origin = origin_of(&origins, &lookup);
        ConfigError::InvalidValue {
            origin,
            key,
            message: e.into_inner().to_string(),
        }
    })
}

/// Parses the file as YAML into a JSON tree; an empty document is an empty mapping.
fn parse_yaml(file: &ConfigFile) -> Result<Value, ConfigError> {
    if file.text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    // A pure-Rust YAML parser; its errors name the line and column.
    let value: Value = serde_saphyr::from_str(&file.text).map_err(|e| {
        // Its first line ("error: line L column C: what") says it all; the rest is a
        // source snippet.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        ConfigError::Yaml {
            file: file.name.clone(),
            message: format!("invalid YAML: {}", first.trim_start_matches("error: ")),
        }
    })?;
    match value {
        Value::Null => Ok(Value::Object(Map::new())),
        Value::Object(_) => Ok(value),
        other => Err(ConfigError::Yaml {
            file: file.name.clone(),
            message: format!(
                "expected a mapping of keys at top level, found {}",
                json_kind(&other)
            ),
        }),
    }
}

/// Merges a file's mapping into `tree`, rejecting keys the defaults do not have.
fn merge_file(
    tree: &mut Value,
    file: Map<String, Value>,
    section: &str,
    origin: &Origin,
    origins: &mut HashMap<String, Origin>,
) -> Result<(), ConfigError> {
    let Value::Object(target) = tree else {
        return Err(ConfigError::Internal(format!(
            "{section:?} is not a section"
        )));
    };
    for (key, value) in file {
        // Keys are matched case-insensitively, as the original (viper) did.
        let key = if target.contains_key(&key) {
            key
        } else {
            key.to_ascii_lowercase()
        };
        let path = join_key(section, &key);
        let Some(slot) = target.get_mut(&key) else {
            return Err(ConfigError::UnknownKey {
                origin: origin.clone(),
                key,
                section: section.to_owned(),
                known: target.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        if value.is_null() {
            // `webhook:` with everything below commented out: keep the defaults.
            continue;
        }
        let is_section = slot.is_object() && !is_map_key(&path);
        if is_section {
            match value {
                Value::Object(map) => merge_file(slot, map, &path, origin, origins)?,
                other => {
                    return Err(ConfigError::InvalidValue {
                        origin: origin.clone(),
                        key: path,
                        message: format!("expected a section of keys, found {}", json_kind(&other)),
                    })
                }
            }
        } else {
            *slot = value;
            origins.insert(path, origin.clone());
        }
    }
    Ok(())
}

/// Reads an environment variable's text as the JSON form of the key's default.
fn env_value(key: &str, default: &Value, var: &str, raw: &str) -> Result<Value, ConfigError> {
    let invalid = |expected: &'static str| ConfigError::InvalidEnv {
        var: var.to_owned(),
        value: raw.to_owned(),
        expected,
    };
    let text = raw.trim();
    match default {
        Value::Bool(_) => parse_bool(text)
            .map(Value::Bool)
            .ok_or_else(|| invalid("a boolean (true or false)")),
        Value::Number(n) if SIZE_KEYS.contains(&key) && n.is_u64() => parse_size(text)
            .map(Value::from)
            .map_err(|_| invalid("a size in bytes, optionally with a unit (100MiB)")),
        Value::Number(n) if n.is_u64() => text
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| invalid("a non-negative integer")),
        Value::Number(n) if n.is_i64() => text
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| invalid("an integer")),
        Value::Number(_) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| invalid("a number")),
        // Commas, or spaces as the original (viper) split them.
        Value::Array(_) => Ok(Value::Array(
            text.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
        // Strings (durations included) are taken verbatim; the deserializer checks formats.
        _ => Ok(Value::String(raw.to_owned())),
    }
}

/// `true/false`, `1/0`, `yes/no`, `on/off`, any case.
fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Every leaf of the default tree (free-form maps count as leaves) with its default value.
fn collect_leaves(tree: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match tree {
        Value::Object(map) if prefix.is_empty() || !is_map_key(prefix) => {
            for (key, value) in map {
                collect_leaves(value, &join_key(prefix, key), out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

/// Sets the value at a dotted path that exists in `tree`.
fn set_path(tree: &mut Value, key: &str, value: Value) {
    let mut node = tree;
    for part in key.split('.') {
        let Value::Object(map) = node else { return };
        node = map.entry(part.to_owned()).or_insert(Value::Null);
    }
    *node = value;
}

fn join_key(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// The key to show for a deserialization error, and the dotted prefix to look its origin up.
fn error_key(path: &serde_path_to_error::Path) -> (String, String) {
    use serde_path_to_error::Segment;
    let mut shown = String::new();
    let mut lookup = String::new();
    let mut in_map = true;
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(key);
                if in_map {
                    lookup = join_key(&lookup, key);
                }
            }
            Segment::Seq { index } => {
                shown.push_str(&format!("[{index}]"));
                in_map = false;
            }
            Segment::Enum { variant } => shown.push_str(&format!("::{variant}")),
            Segment::Unknown => {}
        }
    }
    if shown.is_empty() {
        shown.push_str("(top level)");
    }
    (shown, lookup)
}

/// Origin of the longest recorded prefix of `key`.
fn origin_of(origins: &HashMap<String, Origin>, key: &str) -> Origin {
    let mut candidate = key;
    loop {
        if let Some(origin) = origins.get(candidate) {
            return origin.clone();
        }
        match candidate.rfind('.') {
            Some(dot) => candidate = &candidate[..dot],
            None => return Origin::Default,
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
