//! The registry of adapter kinds: the one list that `--adapter`'s values, the config
//! loader (single sections and `webhooks:`-style lists), validation, redaction, building
//! and the error texts derive from. Adding an adapter is one folder plus one line in the
//! `kinds!` list of `adapter/mod.rs`, which declares the folder's module and puts its
//! `KIND` in [`KINDS`] (see CONTRIBUTING.md).

use super::live::Hubs;
use super::{Adapter, KINDS};
use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::route::Route;

/// One kind of adapter, as its folder describes it (each folder has a `KIND`).
pub struct Kind {
    /// Name in `adapters` / `--adapter`, and the `<kind>` of listed entries `<kind>:<name>`.
    pub name: &'static str,
    /// Key of the config file's list of more adapters of this kind (`webhooks`), if any.
    pub list: Option<&'static str>,
    /// The names of the list's entries in `config` (empty without a list).
    pub entries: fn(&Config) -> Vec<String>,
    /// Checks the kind's section (and list entries); `used` says whether the single
    /// section runs (is in `adapters`), which makes its required keys required.
    pub validate: fn(&Config, used: bool) -> Result<(), ConfigError>,
    /// Masks the kind's secrets in `config` (for logs and `pgpipe config`).
    pub redact: fn(&mut Config),
    /// Builds adapter `name` from the single section (`entry` is `None`) or from the
    /// list entry named `entry`.
    pub build: BuildFn,
    /// The route of the single section (`entry` is `None`) or of the list entry named
    /// `entry`: which channels and operations it gets.
    pub route: fn(&Config, entry: Option<&str>) -> Route,
    /// What `pgpipe init --adapter <kind>` prints for the quoted, schema-qualified table
    /// name it is given (the adapter's target table), for kinds that need one.
    pub init: Option<fn(table: &str) -> String>,
}

/// Builds adapter `name` from the single section or the list entry `entry`.
pub type BuildFn = fn(&Build<'_>, &str, Option<&str>) -> Result<Box<dyn Adapter>, Error>;

/// What building an adapter may use.
pub struct Build<'a> {
    /// The whole configuration.
    pub config: &'a Config,
    /// The live adapters' hubs, when the HTTP server runs (`pgpipe listen`).
    pub hubs: Option<&'a Hubs>,
}

/// The kind named `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().copied().find(|k| k.name == name)
}

/// The adapter names `adapters` / `--adapter` accept.
pub fn names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name).collect()
}

/// The kinds `pgpipe init --adapter` prints SQL for.
pub fn with_init() -> Vec<&'static str> {
    KINDS
        .iter()
        .filter(|k| k.init.is_some())
        .map(|k| k.name)
        .collect()
}

/// The config keys of the lists of more adapters (`webhooks`, `files`, ...).
pub fn lists() -> impl Iterator<Item = &'static str> {
    KINDS.iter().filter_map(|k| k.list)
}

/// The adapters to run: those in `config.adapters`, then `<kind>:<name>` per list entry.
pub fn configured(config: &Config) -> Vec<String> {
    let mut all = config.adapters.clone();
    for kind in KINDS {
        all.extend(
            (kind.entries)(config)
                .iter()
                .map(|e| format!("{}:{e}", kind.name)),
        );
    }
    all
}

/// Builds the adapter `name` (`webhook`, or `webhook:<entry>` for a listed one).
pub fn build(build: &Build<'_>, name: &str) -> Result<Box<dyn Adapter>, Error> {
    let (kind_name, entry) = match name.split_once(':') {
        Some((kind, entry)) => (kind, Some(entry)),
        None => (name, None),
    };
    let Some(kind) = kind(kind_name) else {
        return Err(Error::Config(format!(
            "adapter {name:?} is not available in this build (available: {})",
            names().join(", ")
        )));
    };
    let adapter = (kind.build)(build, name, entry)?;
    Ok(super::routed(adapter, (kind.route)(build.config, entry)))
}

/// Checks every kind's section and list.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    for kind in KINDS {
        (kind.validate)(config, config.has_adapter(kind.name))?;
    }
    Ok(())
}

/// Masks every kind's secrets.
pub fn redact(config: &mut Config) {
    for kind in KINDS {
        (kind.redact)(config);
    }
}

/// Where a section sits in the config tree, for error messages that name the key: the
/// single section (`webhook`) or entry `index` of its list (`webhooks[1]`).
#[derive(Debug, Clone, Copy)]
pub struct Place {
    /// The single section's key.
    pub section: &'static str,
    /// The list's key and the entry's position, for a listed entry.
    pub entry: Option<(&'static str, usize)>,
}

impl Place {
    /// The single section `section`.
    pub fn single(section: &'static str) -> Place {
        Place {
            section,
            entry: None,
        }
    }

    /// Entry `index` of list `list`.
    pub fn listed(section: &'static str, list: &'static str, index: usize) -> Place {
        Place {
            section,
            entry: Some((list, index)),
        }
    }

    /// The section's own key: `webhook`, `webhooks[1]`.
    pub fn here(&self) -> String {
        match self.entry {
            None => self.section.to_string(),
            Some((list, index)) => format!("{list}[{index}]"),
        }
    }

    /// The dotted key of `field` here: `webhook.url`, `webhooks[1].url`.
    pub fn key(&self, field: &str) -> String {
        match self.entry {
            None => format!("{}.{field}", self.section),
            Some((list, index)) => format!("{list}[{index}].{field}"),
        }
    }

    /// A required key is missing: `single` for the single section (its message says
    /// which flag and variable set it), "needs {what}" for a list entry.
    pub fn missing(&self, what: &str, single: ConfigError) -> ConfigError {
        match self.entry {
            None => single,
            Some((list, index)) => ConfigError::ListedAdapter {
                list,
                index,
                message: format!("needs {what}"),
            },
        }
    }
}

/// Checks every entry of list `list` with `check`, and that their names are usable and
/// distinct (`name` gives an entry's name).
pub fn check_list<T>(
    section: &'static str,
    list: &'static str,
    entries: &[T],
    name: impl Fn(&T) -> &str,
    check: impl Fn(&T, Place) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    for (index, entry) in entries.iter().enumerate() {
        let bad = |message: String| ConfigError::ListedAdapter {
            list,
            index,
            message,
        };
        let entry_name = name(entry);
        let name_ok = !entry_name.is_empty()
            && entry_name.len() <= crate::config::MAX_CHANNEL_LEN
            && entry_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(bad(format!(
                "name {entry_name:?}: give each entry a name of letters, digits, '_' and '-'"
            )));
        }
        if entries[..index].iter().any(|e| name(e) == entry_name) {
            return Err(bad(format!("name {entry_name:?} is used twice")));
        }
        check(entry, Place::listed(section, list, index))?;
    }
    Ok(())
}

/// The section a build uses: the single one, or the list entry named `entry`.
pub fn section<'a, T>(
    name: &str,
    single: &'a T,
    list_key: &str,
    list: &'a [T],
    entry: Option<&str>,
    entry_name: impl Fn(&T) -> &str,
) -> Result<&'a T, Error> {
    match entry {
        None => Ok(single),
        Some(wanted) => list
            .iter()
            .find(|e| entry_name(e) == wanted)
            .ok_or_else(|| {
                Error::Config(format!(
                    "adapter {name:?}: no {list_key} entry is named {wanted:?}"
                ))
            }),
    }
}

/// For kinds without a list: no entries.
pub fn no_entries(_: &Config) -> Vec<String> {
    Vec::new()
}

/// Checks the routes (`channels`, `operations`, which `fields` gives) of a kind's single
/// section and of every entry of its list against the channels the forwarder reads.
pub fn check_routes<T>(
    config: &Config,
    section: &'static str,
    list: &'static str,
    single: &T,
    entries: &[T],
    fields: impl Fn(&T) -> (&Vec<String>, &Vec<String>),
) -> Result<(), ConfigError> {
    let places = std::iter::once((Place::single(section), single)).chain(
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| (Place::listed(section, list, i), e)),
    );
    for (at, entry) in places {
        let (channels, operations) = fields(entry);
        crate::route::check(at, channels, operations, &config.channels)?;
    }
    Ok(())
}

/// For kinds without a route: every event.
pub fn every_event(_: &Config, _: Option<&str>) -> Route {
    Route::all()
}

/// The route of the section `entry` names (the single one for `None`); an unknown
/// entry gets every event (building it fails with the entry's name anyway).
pub fn route_of<T>(
    single: &T,
    list: &[T],
    entry: Option<&str>,
    entry_name: impl Fn(&T) -> &str,
    route: impl Fn(&T) -> Route,
) -> Route {
    match entry {
        None => route(single),
        Some(wanted) => list
            .iter()
            .find(|e| entry_name(e) == wanted)
            .map_or_else(Route::all, route),
    }
}

/// For kinds without settings: nothing to check.
pub fn nothing_to_check(_: &Config, _: bool) -> Result<(), ConfigError> {
    Ok(())
}

/// For kinds without secrets: nothing to mask.
pub fn no_secrets(_: &mut Config) {}
