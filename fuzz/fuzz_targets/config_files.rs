//! Files Gaffer reads from its data directories and from operators: configuration, identity,
//! installed-model manifests, PEM keys and certificates, CRLs, fingerprints, bundle keys.
//!
//! Input: byte 0 selects the file ([`gaffer_fuzz::input::ConfigFile`]), the rest is its
//! contents; pairs are split at the first `0xFF`. Each goes through the parser the program uses
//! and the checks it makes next; what parses must serialize and parse back to the same value. No
//! panic, and no allocation beyond what the input's size justifies.
//!
//! A new configuration file format gets a `ConfigFile` variant, an arm here and a seed in
//! `gaffer_fuzz::corpus::config_files`.
#![no_main]

use gaffer_agent::datadir::AgentIdentity;
use gaffer_agent::models::InstalledManifest;
use gaffer_certs::{AgentKey, BundleKey, BundleSigner, CaFingerprint, FleetCa};
use gaffer_control::datadir::ControlConfig;
use gaffer_fuzz::input::ConfigFile;
use gaffer_protocol::messages::Capabilities;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

/// Parses JSON the way the program reads the file (text first where it uses `read_to_string`),
/// and checks that what parses survives a write and a read.
fn json<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<T> {
    let text = std::str::from_utf8(bytes).ok()?;
    let value: T = serde_json::from_str(text).ok()?;
    let again =
        serde_json::to_string_pretty(&value).unwrap_or_else(|e| panic!("a parsed file does not serialize: {e}"));
    let back: T =
        serde_json::from_str(&again).unwrap_or_else(|e| panic!("a written file does not parse: {e}\n{again}"));
    assert_eq!(back, value, "writing and reading the file back changed it");
    Some(value)
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn problems_are_placed(text: &str, problems: &[gaffer_agent::config::Problem]) {
    let placed = problems.iter().map(|p| (p.line, p.column, p.message.as_str())).collect::<Vec<_>>();
    placed_in(text, &placed, gaffer_agent::config::PROBLEMS_MAX);
}

/// A refused file has at least one problem, each (but the count of those not listed) at a line
/// and column inside the file, in file order, at most `max` of them.
fn placed_in(text: &str, problems: &[(Option<usize>, Option<usize>, &str)], max: usize) {
    assert!(!problems.is_empty(), "a refused file with no problem");
    assert!(problems.len() <= max, "{} problems listed", problems.len());
    let lines = text.split('\n').collect::<Vec<_>>();
    let mut last = (0, 0);
    for (i, &(line, column, message)) in problems.iter().enumerate() {
        let (Some(line), Some(column)) = (line, column) else {
            assert_eq!(i, max - 1, "only the count has no place: {message}");
            continue;
        };
        let width = lines.get(line - 1).map(|l| l.chars().count()).unwrap_or_else(|| panic!("line {line}: {message}"));
        assert!(column >= 1 && column <= width + 1, "{line}:{column} is outside the line: {message}");
        assert!((line, column) >= last, "problems out of order at {line}:{column}");
        last = (line, column);
    }
}

fuzz_target!(|data: &[u8]| {
    gaffer_fuzz::reset_largest_allocation();
    let Some((&selector, rest)) = data.split_first() else { return };
    match ConfigFile::of(selector) {
        ConfigFile::ControlConfig => {
            // `DataDir::load_config`, then `serve`/`tls` use the first server name.
            if let Some(cfg) = json::<ControlConfig>(rest) {
                let _ = cfg.server_names.first();
            }
        }
        ConfigFile::AgentIdentity => {
            // `DataDir::load_identity`; `run` then parses the fingerprint and the address.
            if let Some(identity) = json::<AgentIdentity>(rest) {
                let _ = identity.ca_fingerprint.parse::<CaFingerprint>();
                let _ = gaffer_agent::link::server_name_of(&identity.control_addr);
                if let Some(r) = &identity.bundle_recipient {
                    let _ = gaffer_certs::check_bundle_recipient(r);
                }
            }
        }
        ConfigFile::InstalledManifest => {
            // `Registry::open` → `verify_item`: parse, then compare with the compiled-in manifest.
            if let Some(installed) = json::<InstalledManifest>(rest) {
                let _ = gaffer_agent::models::known_item(&installed.name).map(|item| item.sha256() == installed.sha256);
            }
        }
        ConfigFile::Capabilities => {
            // `bundle export` reads what `run` last advertised.
            let _ = serde_json::from_slice::<Capabilities>(rest);
        }
        ConfigFile::CaPemAndKey => {
            let (cert, key) = gaffer_fuzz::split2(rest);
            if let (Some(cert), Some(key)) = (text(cert), text(key)) {
                if let Ok(ca) = FleetCa::from_pem(cert, key) {
                    let again = FleetCa::from_pem(&ca.cert_pem(), &ca.key_pem())
                        .unwrap_or_else(|e| panic!("a loaded CA does not load again from its own PEM: {e}"));
                    assert_eq!(again.fingerprint(), ca.fingerprint());
                }
            }
        }
        ConfigFile::CrlPem => {
            if let Some(t) = text(rest) {
                let _ = FleetCa::crls_from_pem(t);
            }
        }
        ConfigFile::CaFingerprint => {
            if let Some(t) = text(rest) {
                if let Ok(fp) = t.parse::<CaFingerprint>() {
                    let back: CaFingerprint =
                        fp.to_string().parse().unwrap_or_else(|e| panic!("a fingerprint's text does not parse: {e}"));
                    assert_eq!(back, fp);
                }
            }
        }
        ConfigFile::CaPemFingerprint => {
            if let Some(t) = text(rest) {
                let _ = CaFingerprint::from_cert_pem(t);
            }
        }
        ConfigFile::AgentKeyPem => {
            if let Some(t) = text(rest) {
                if let Ok(key) = AgentKey::from_pem(t) {
                    let _ = key.csr_pem(uuid::Uuid::nil());
                }
            }
        }
        ConfigFile::SignerPemAndKey => {
            let (cert, key) = gaffer_fuzz::split2(rest);
            if let (Some(cert), Some(key)) = (text(cert), text(key)) {
                let _ = BundleSigner::from_pem(cert, key);
            }
        }
        ConfigFile::BundleKey => {
            if let Some(t) = text(rest) {
                if let Ok(key) = BundleKey::from_secret_str(t) {
                    let again = BundleKey::from_secret_str(&key.secret_string())
                        .unwrap_or_else(|e| panic!("a bundle key does not load from its own text: {e}"));
                    assert_eq!(again.recipient(), key.recipient());
                    gaffer_certs::check_bundle_recipient(&key.recipient())
                        .unwrap_or_else(|e| panic!("a bundle key's own recipient is refused: {e}"));
                }
            }
        }
        ConfigFile::WheelOrItemName => {
            if let Some(t) = text(rest) {
                let _ = gaffer_agent::models::manifest::items_for_wheel(t);
                let _ = gaffer_agent::models::known_item(t);
            }
        }
        ConfigFile::AgentToml => {
            // `validate` / `run --config`: every problem, or the options; `run --print-config`
            // prints the settings as a file that must read back to the same settings.
            if let Some(t) = text(rest) {
                match gaffer_agent::config::check(t) {
                    Ok(options) => {
                        if let Ok(settings) = options.resolve() {
                            let printed = settings.to_toml();
                            let back = gaffer_agent::config::check(&printed)
                                .unwrap_or_else(|p| panic!("printed settings do not check: {p:?}\n{printed}"))
                                .resolve()
                                .unwrap_or_else(|e| panic!("printed settings do not resolve: {e}\n{printed}"));
                            assert_eq!(back, settings, "printing and reading the settings changed them\n{printed}");
                        }
                    }
                    Err(problems) => problems_are_placed(t, &problems),
                }
            }
        }
        ConfigFile::ControlToml => {
            if let Some(t) = text(rest) {
                match gaffer_control::config::check(t) {
                    Ok(file) => {
                        let _ = file.init.resolve();
                        if let Ok(settings) = file.serve.resolve() {
                            let printed = settings.to_toml();
                            let back = gaffer_control::config::check(&printed)
                                .unwrap_or_else(|p| panic!("printed settings do not check: {p:?}\n{printed}"))
                                .serve
                                .resolve()
                                .unwrap_or_else(|e| panic!("printed settings do not resolve: {e}\n{printed}"));
                            assert_eq!(back, settings, "printing and reading the settings changed them\n{printed}");
                        }
                    }
                    Err(problems) => {
                        let placed =
                            problems.iter().map(|p| (p.line, p.column, p.message.as_str())).collect::<Vec<_>>();
                        placed_in(t, &placed, gaffer_control::config::PROBLEMS_MAX);
                    }
                }
            }
        }
    }
    gaffer_fuzz::check_allocations(data.len(), "config files");
});
