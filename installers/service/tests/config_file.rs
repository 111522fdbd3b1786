//! The generic configuration-file checker on real files, with a small checker built from its
//! parts the way the programs build theirs (`tests/tests/config.rs` runs both programs'
//! `validate` on their own keys): the size limit before reading, text that is not UTF-8, every
//! problem in file order with its line and column, values a syntax error damaged left alone, the
//! cap on problems, the value readers' messages, and what `validate` prints.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use gaffer_service::config_file::{
    self, absolute_path, boolean, dash_hint, flag_integer, flag_integer_u32, integer, integer_u32, nonempty, parsed,
    Doc, Problem, CONFIG_BYTES_MAX, PROBLEMS_MAX,
};
use gaffer_service::ServiceError;

const KEYS: &[&str] = &["data_dir", "slots", "offline", "name", "job_timeout", "big"];
const SLOTS: RangeInclusive<u64> = 1..=64;

/// What the test checker reads: one value per key.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    data_dir: Option<PathBuf>,
    slots: Option<u32>,
    offline: Option<bool>,
    name: Option<String>,
    job_timeout_secs: Option<u64>,
    big: Option<u64>,
}

/// A checker made of the crate's parts, as `gaffer-agent`'s and `gaffer-control`'s are.
fn check(text: &str) -> Result<Options, Vec<Problem>> {
    let (mut doc, root) = Doc::parse(text);
    let mut o = Options::default();
    for (key, value) in root.get_ref() {
        let name = key.get_ref().as_ref();
        if !KEYS.contains(&name) {
            let message = dash_hint(name, |k| KEYS.contains(&k)).unwrap_or_else(|| "unknown key".into());
            doc.report(key.span(), Some(name), message);
            continue;
        }
        if doc.is_damaged(&value.span()) {
            continue;
        }
        let applied = match name {
            "data_dir" => absolute_path(value, "\"/var/lib/x\"").map(|v| o.data_dir = Some(v)),
            "slots" => integer_u32(value, &SLOTS).map(|v| o.slots = Some(v)),
            "offline" => boolean(value).map(|v| o.offline = Some(v)),
            "name" => nonempty(value, "\"studio\"").map(|v| o.name = Some(v.to_owned())),
            "job_timeout" => parsed(value, "\"20\"", |t| flag_integer(t, &(1..=u64::MAX))).map(|v| {
                o.job_timeout_secs = Some(v);
            }),
            "big" => integer(value, &(0..=u64::MAX)).map(|v| o.big = Some(v)),
            _ => Ok(()),
        };
        if let Err(bad) = applied {
            doc.report(bad.span, Some(name), bad.message);
        }
    }
    doc.finish().map(|()| o)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write the test file");
    path
}

/// Where a problem is and what it says: (line, column, key, message).
type Placed<'a> = (Option<usize>, Option<usize>, Option<&'a str>, &'a str);

/// (line, column, key, message) of each problem.
fn placed(problems: &[Problem]) -> Vec<Placed<'_>> {
    problems.iter().map(|p| (p.line, p.column, p.key.as_deref(), p.message.as_str())).collect()
}

#[test]
fn every_value_is_read_by_its_reader() {
    let text = "data_dir = \"/srv/x\"\nslots = 0x10\noffline = false\nname = \"a\"\njob_timeout = \"90\"\n\
                big = 18446744073709551615\n";
    let o = check(text).expect("a good file");
    assert_eq!(
        o,
        Options {
            data_dir: Some("/srv/x".into()),
            slots: Some(16),
            offline: Some(false),
            name: Some("a".into()),
            job_timeout_secs: Some(90),
            big: Some(u64::MAX),
        }
    );
}

#[test]
fn every_problem_is_listed_in_file_order_with_its_line_column_and_key() {
    let text = "name = \"\"\n\
                slots = 65\n\
                data_dir = \"relative/dir\"\n\
                offline = \"yes\"\n\
                job-timeout = \"5\"\n\
                job_timeout = \"five\"\n\
                slots_max = 3\n\
                big = -1\n\
                name = 7\n";
    let problems = check(text).expect_err("all wrong");
    assert_eq!(
        placed(&problems),
        [
            (Some(1), Some(8), Some("name"), "empty; write e.g. \"studio\""),
            (Some(2), Some(9), Some("slots"), "65 is out of range: 1..=64"),
            (
                Some(3),
                Some(12),
                Some("data_dir"),
                "\"relative/dir\" is a relative path; write it absolute, e.g. \"/relative/dir\""
            ),
            (Some(4), Some(11), Some("offline"), "expected true or false; found a string"),
            (Some(5), Some(1), Some("job-timeout"), "unknown key; write `job_timeout` (flags' `-` is `_` in the file)"),
            (Some(6), Some(15), Some("job_timeout"), "\"five\" is not a whole number"),
            (Some(7), Some(1), Some("slots_max"), "unknown key"),
            (Some(8), Some(7), Some("big"), "-1 is out of range: at least 0"),
            // A duplicate key is a syntax error; the value stays unread.
            (Some(9), Some(1), None, "TOML syntax: duplicate key"),
        ]
    );
}

#[test]
fn a_syntax_error_is_listed_with_the_other_problems_and_damaged_values_are_not_checked() {
    let problems = check("slots = 2\njob_timeout = 10m\nbogus = true\nslots_max = 3\n").expect_err("a syntax error");
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert_eq!((problems[0].line, problems[0].key.as_deref()), (Some(2), None));
    assert!(problems[0].message.starts_with("TOML syntax: "), "{problems:?}");
    assert_eq!((problems[1].line, problems[1].key.as_deref()), (Some(3), Some("bogus")));
    assert_eq!((problems[2].line, problems[2].key.as_deref()), (Some(4), Some("slots_max")));

    // An unclosed array at the end of the file: reported once, at the last line.
    let problems = check("data_dir = \"/d\"\nslots = [1,\n").expect_err("unclosed");
    assert_eq!(problems.iter().map(|p| p.line).collect::<Vec<_>>(), [Some(2)], "{problems:?}");
}

#[test]
fn a_list_over_the_cap_counts_the_rest() {
    let text: String = (0..150).map(|i| format!("unknown_{i} = 1\n")).collect();
    let problems = check(&text).expect_err("all unknown");
    assert_eq!(problems.len(), PROBLEMS_MAX);
    assert_eq!(problems[PROBLEMS_MAX - 2].line, Some(PROBLEMS_MAX - 1));
    assert_eq!(
        problems[PROBLEMS_MAX - 1],
        Problem { line: None, column: None, key: None, message: "51 more problems not listed".into() }
    );
}

#[test]
fn flags_share_the_range_check_of_the_file() {
    assert_eq!(flag_integer(" 64 ", &SLOTS), Ok(64));
    assert_eq!(flag_integer("65", &SLOTS), Err("65 is out of range: 1..=64".into()));
    assert_eq!(flag_integer("-1", &(0..=u64::MAX)), Err("-1 is out of range: at least 0".into()));
    assert_eq!(flag_integer("four", &SLOTS), Err("\"four\" is not a whole number".into()));
    assert_eq!(flag_integer_u32("4294967295", &(0..=u64::MAX)), Ok(u32::MAX));
    assert_eq!(flag_integer_u32("4294967296", &(0..=u64::MAX)), Err("4294967296 is out of range: at least 0".into()));
    let problems = check("slots = 4294967296\n").expect_err("past the range");
    assert_eq!(problems[0].message, "4294967296 is out of range: 1..=64");
}

#[test]
fn a_file_of_exactly_one_mib_is_read_and_a_larger_one_is_refused_unread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut text = "data_dir = \"/d\"\n".to_owned();
    while (text.len() as u64) < CONFIG_BYTES_MAX {
        let room = (CONFIG_BYTES_MAX as usize - text.len()).min(1024);
        text.push_str(&format!("#{}\n", "x".repeat(room - 2)));
    }
    assert_eq!(text.len() as u64, CONFIG_BYTES_MAX);
    let exactly = write(dir.path(), "exactly.toml", text.as_bytes());
    let o = config_file::load(&exactly, "gaffer-test", check).expect("1 MiB is allowed");
    assert_eq!(o.data_dir, Some("/d".into()));
    assert_eq!(config_file::validate(&exactly, check), []);

    text.push('\n');
    let over = write(dir.path(), "over.toml", text.as_bytes());
    let problems = config_file::validate(&over, check);
    assert_eq!(
        placed(&problems),
        [(
            None,
            None,
            None,
            "the file is 1048577 bytes; a configuration file may be at most 1048576 bytes (1 MiB): it was not read"
        )]
    );
    // An endless file (no size to look at first): reading stops after the limit.
    let problems = config_file::validate(Path::new("/dev/zero"), check);
    assert_eq!(
        placed(&problems),
        [(
            None,
            None,
            None,
            "the file is more than that bytes; a configuration file may be at most 1048576 bytes (1 MiB): it was not \
             read"
        )]
    );
}

#[test]
fn unreadable_files_and_text_that_is_not_utf8_are_problems_of_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = config_file::validate(&dir.path().join("missing.toml"), check);
    assert_eq!(missing.len(), 1);
    assert!(missing[0].message.starts_with("cannot open it: "), "{missing:?}");
    assert_eq!(config_file::validate(dir.path(), check)[0].message, "is a directory, not a configuration file");

    // Line 2, after "é = " (4 characters, 5 bytes): column 5.
    let latin1 = write(dir.path(), "latin1.toml", b"slots = 2\n\xc3\xa9 = \xe9\n");
    assert_eq!(
        placed(&config_file::validate(&latin1, check)),
        [(Some(2), Some(5), None, "not UTF-8 text: a configuration file is TOML, which is UTF-8")]
    );
}

#[test]
fn load_lists_every_problem_and_names_the_programs_validate_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(dir.path(), "x.toml", b"slots = 0\nname = 1\n");
    let e = config_file::load(&file, "gaffer-test", check).expect_err("two problems");
    let f = file.display();
    assert_eq!(
        e.to_string(),
        format!(
            "{f}: 2 problems (check the file with `gaffer-test validate --config {f}`):\n  \
             {f}:1:9: slots: 0 is out of range: 1..=64\n  \
             {f}:2:8: name: expected a string, e.g. \"studio\"; found an integer"
        )
    );
    let ServiceError::ConfigFile { path, program, problems } = e else { panic!("a config file error") };
    assert_eq!((path, program, problems.len()), (file.clone(), "gaffer-test", 2));

    let one = write(dir.path(), "one.toml", b"slots = 0\n");
    let e = config_file::load(&one, "gaffer-test", check).expect_err("one problem");
    assert!(e.to_string().starts_with(&format!("{}: 1 problem (check", one.display())), "{e}");
}

#[test]
fn validate_prints_ok_every_problem_or_json() {
    let path = Path::new("/etc/gaffer/x.toml");
    assert_eq!(config_file::report(path, &[], false), "/etc/gaffer/x.toml: ok\n");
    assert_eq!(config_file::report(path, &[], true), "{\"errors\":[],\"ok\":true}\n");

    let problems = check("slots = 0\nbogus = 1\n").expect_err("two problems");
    assert_eq!(
        config_file::report(path, &problems, false),
        "/etc/gaffer/x.toml:1:9: slots: 0 is out of range: 1..=64\n\
         /etc/gaffer/x.toml:2:1: bogus: unknown key\n\
         /etc/gaffer/x.toml: 2 problems\n"
    );
    assert_eq!(config_file::report(path, &problems[..1], false).lines().last(), Some("/etc/gaffer/x.toml: 1 problem"));

    let too_large = Problem { line: None, column: None, key: None, message: "too large".into() };
    assert_eq!(
        config_file::report(path, &[too_large], false),
        "/etc/gaffer/x.toml: too large\n/etc/gaffer/x.toml: 1 problem\n"
    );

    let json = config_file::report(path, &problems, true);
    assert!(json.ends_with('\n') && json.trim_end().lines().count() == 1, "{json}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(
        report,
        serde_json::json!({
            "ok": false,
            "errors": [
                {"line": 1, "column": 9, "key": "slots", "message": "0 is out of range: 1..=64"},
                {"line": 2, "column": 1, "key": "bogus", "message": "unknown key"},
            ]
        })
    );
    let whole = Problem { line: None, column: None, key: None, message: "m".into() };
    assert_eq!(
        serde_json::to_value(&whole).expect("JSON"),
        serde_json::json!({"line": null, "column": null, "key": null, "message": "m"})
    );
}
