//! Configuration files (`/etc/gaffer/agent.toml`, `/etc/gaffer/control.toml`): the checker each
//! program builds its own `check` from, and what `validate` prints.
//!
//! A program's `check(text) -> Result<Options, Vec<Problem>>` parses the text with [`Doc::parse`]
//! (toml's `DeTable` with spans, recovering after a syntax error; each syntax error is a
//! [`Problem`]), walks the table, reports unknown keys with [`Doc::report`] (with
//! [`dash_hint`] for a flag's spelling), skips the values a syntax error damaged
//! ([`Doc::is_damaged`]), and reads every other value with the readers here — [`string`],
//! [`nonempty`], [`parsed`] (the flag's own parser), [`integer`] and [`integer_u32`] (the flag's
//! range), [`boolean`], [`absolute_path`] — which say where a value is [`Bad`] and why. It ends
//! with [`Doc::finish`]: every problem in file order. The flags' parsers check their ranges with
//! the same [`in_range`] ([`flag_integer`], [`flag_integer_u32`]), so a flag and its key accept
//! and refuse the same values.
//!
//! [`load`] reads a file and runs such a checker ([`ServiceError::ConfigFile`] lists every
//! problem); [`validate`] gives the problems; [`report`] is what `validate` prints (text, or JSON
//! with `--json`).
//!
//! Limits: a file larger than [`CONFIG_BYTES_MAX`] is refused before it is read (and no more than
//! that is read from one that grows, or from no regular file); at most [`PROBLEMS_MAX`] problems
//! are listed.

use std::io::Read as _;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::ServiceError;

/// Largest configuration file read, bytes (1 MiB); a larger one is refused unread.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
/// Most problems listed for one file; the rest are counted in a last problem.
pub const PROBLEMS_MAX: usize = 100;

/// One problem of a configuration file. Serialized (`validate --json`) as
/// `{"line", "column", "key", "message"}`, `null` where a part is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Line, from 1; `None` for a problem of the whole file (too large, unreadable).
    pub line: Option<usize>,
    /// Column, in characters from 1; `None` with `line`.
    pub column: Option<usize>,
    /// The key, dotted from the top of the file (`init.fleet_name`); `None` for syntax errors and
    /// problems of the whole file.
    pub key: Option<String>,
    /// What is wrong, and what to write instead.
    pub message: String,
}

impl Problem {
    fn whole_file(message: String) -> Problem {
        Problem { line: None, column: None, key: None, message }
    }

    /// `FILE:LINE:COLUMN: KEY: MESSAGE`, leaving out the parts that are `None`.
    pub fn display_in(&self, path: &Path) -> String {
        let mut out = path.display().to_string();
        if let (Some(line), Some(column)) = (self.line, self.column) {
            out.push_str(&format!(":{line}:{column}"));
        }
        if let Some(key) = &self.key {
            out.push_str(&format!(": {key}"));
        }
        out.push_str(&format!(": {}", self.message));
        out
    }
}

/// The message of [`ServiceError::ConfigFile`]: a count, the `validate` command to run, and every
/// problem on its own line.
pub(crate) fn render_problems(program: &str, path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "{}: {} problem{} (check the file with `{program} validate --config {}`):",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        path.display()
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.display_in(path));
    }
    out
}

/// Reads the configuration file at `path` and checks it with `check`, the program's checker.
/// `program` (`gaffer-agent`, `gaffer-control`) names the `validate` command in the error.
///
/// # Errors
/// [`ServiceError::ConfigFile`] with every problem: the file is missing or unreadable, a
/// directory, larger than [`CONFIG_BYTES_MAX`] (refused before reading), not UTF-8, or refused by
/// `check` (syntax, unknown keys, values its flags would refuse).
pub fn load<T>(
    path: &Path,
    program: &'static str,
    check: impl FnOnce(&str) -> Result<T, Vec<Problem>>,
) -> Result<T, ServiceError> {
    let file_error = |problems| ServiceError::ConfigFile { path: path.to_owned(), program, problems };
    let text = read_limited(path).map_err(|p| file_error(vec![p]))?;
    check(&text).map_err(file_error)
}

/// The problems of the file at `path` as [`load`] finds them (`validate`); empty when it is fine.
pub fn validate<T>(path: &Path, check: impl FnOnce(&str) -> Result<T, Vec<Problem>>) -> Vec<Problem> {
    match read_limited(path) {
        Ok(text) => check(&text).err().unwrap_or_default(),
        Err(problem) => vec![problem],
    }
}

/// What `validate --config PATH` prints for `problems`, ending in a newline: `PATH: ok`, or every
/// problem as `PATH:LINE:COLUMN: KEY: MESSAGE` and then `PATH: N problems`; with `json`,
/// `{"ok": bool, "errors": [{"line", "column", "key", "message"}, …]}` on one line. `validate`
/// then exits with status 1 when there are problems.
pub fn report(path: &Path, problems: &[Problem], json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::json!({ "ok": problems.is_empty(), "errors": problems }));
    }
    if problems.is_empty() {
        return format!("{}: ok\n", path.display());
    }
    let mut out = String::new();
    for p in problems {
        out.push_str(&p.display_in(path));
        out.push('\n');
    }
    let n = problems.len();
    out.push_str(&format!("{}: {n} problem{}\n", path.display(), if n == 1 { "" } else { "s" }));
    out
}

/// Reads the file as UTF-8, refusing one larger than [`CONFIG_BYTES_MAX`] before reading it (and
/// reading no more than that from a file that grows, or is no regular file).
fn read_limited(path: &Path) -> Result<String, Problem> {
    let file = std::fs::File::open(path).map_err(|e| Problem::whole_file(format!("cannot open it: {e}")))?;
    let too_large = |bytes: String| {
        Problem::whole_file(format!(
            "the file is {bytes} bytes; a configuration file may be at most {CONFIG_BYTES_MAX} bytes (1 MiB): \
             it was not read"
        ))
    };
    let meta = file.metadata().map_err(|e| Problem::whole_file(format!("cannot read it: {e}")))?;
    if meta.is_dir() {
        return Err(Problem::whole_file("is a directory, not a configuration file".into()));
    }
    if meta.len() > CONFIG_BYTES_MAX {
        return Err(too_large(meta.len().to_string()));
    }
    let mut bytes = Vec::new();
    file.take(CONFIG_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Problem::whole_file(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > CONFIG_BYTES_MAX {
        return Err(too_large("more than that".into()));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = std::str::from_utf8(valid)
            .map_or(0, |v| v.rsplit_once('\n').map_or(v, |(_, last)| last).chars().count())
            + 1;
        Problem {
            line: Some(line),
            column: Some(column),
            key: None,
            message: "not UTF-8 text: a configuration file is TOML, which is UTF-8".into(),
        }
    })
}

// ---- Whole numbers: one range check for the flags and the file. ----

/// A flag's whole number (`--slots 4`), checked as the file's integers are ([`in_range`]).
///
/// # Errors
/// `"\"x\" is not a whole number"`, or the range message of [`in_range`].
pub fn flag_integer(text: &str, range: &RangeInclusive<u64>) -> Result<u64, String> {
    let n: i128 = text.trim().parse().map_err(|_| format!("{text:?} is not a whole number"))?;
    in_range(n, range)
}

/// [`flag_integer`] for a setting kept as `u32` (`range` should fit in it).
///
/// # Errors
/// As [`flag_integer`], and `"N is out of range: …"` for a number past `u32::MAX`.
pub fn flag_integer_u32(text: &str, range: &RangeInclusive<u64>) -> Result<u32, String> {
    let n = flag_integer(text, range)?;
    u32::try_from(n).map_err(|_| format!("{n} is out of range: {}", range_text(range)))
}

/// `n` if it lies in `range`: the one range check of the flags and the file.
///
/// # Errors
/// `"N is out of range: 1..=64"` (see [`range_text`]).
pub fn in_range(n: i128, range: &RangeInclusive<u64>) -> Result<u64, String> {
    if n < i128::from(*range.start()) || n > i128::from(*range.end()) {
        return Err(format!("{n} is out of range: {}", range_text(range)));
    }
    u64::try_from(n).map_err(|_| format!("{n} is out of range: {}", range_text(range)))
}

/// `1..=64`, or `at least 0` for a range open at the top (ending at `u64::MAX`).
pub fn range_text(range: &RangeInclusive<u64>) -> String {
    match *range.end() {
        u64::MAX => format!("at least {}", range.start()),
        end => format!("{}..={end}", range.start()),
    }
}

/// The hint for an unknown key written with a flag's `-` where the file's key has `_`
/// (`job-timeout` for `job_timeout`): `Some("unknown key; write `job_timeout` (…)")` when `known`
/// says the `_` spelling is a key.
pub fn dash_hint(key: &str, known: impl Fn(&str) -> bool) -> Option<String> {
    let underscored = key.replace('-', "_");
    (underscored != key && known(&underscored))
        .then(|| format!("unknown key; write `{underscored}` (flags' `-` is `_` in the file)"))
}

// ---- Values: typed readers that say where a value is wrong and why. ----

/// A value that cannot be used: where (the value, or an element of it) and why. Report it with
/// [`Doc::report`]`(bad.span, key, bad.message)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad {
    /// Byte range of the value in the text.
    pub span: Range<usize>,
    /// What is wrong, and what to write instead.
    pub message: String,
}

impl Bad {
    /// `value` is wrong because of `message`.
    pub fn at(value: &Spanned<DeValue<'_>>, message: impl Into<String>) -> Bad {
        Bad { span: value.span(), message: message.into() }
    }
}

/// "a string", "an integer", … for messages.
pub fn kind(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A string; `example` (a TOML value, e.g. `"\"20m\""`) is shown when the value is another type.
///
/// # Errors
/// `expected a string, e.g. EXAMPLE; found an integer`.
pub fn string<'a>(value: &'a Spanned<DeValue<'_>>, example: &str) -> Result<&'a str, Bad> {
    match value.get_ref() {
        DeValue::String(s) => Ok(s.as_ref()),
        other => Err(Bad::at(value, format!("expected a string, e.g. {example}; found {}", kind(other)))),
    }
}

/// A string that is not empty.
///
/// # Errors
/// As [`string`], and `empty; write e.g. EXAMPLE`.
pub fn nonempty<'a>(value: &'a Spanned<DeValue<'_>>, example: &str) -> Result<&'a str, Bad> {
    match string(value, example)? {
        "" => Err(Bad::at(value, format!("empty; write e.g. {example}"))),
        s => Ok(s),
    }
}

/// A string read by `parse`, the flag's own parser.
///
/// # Errors
/// As [`string`], and `parse`'s error as the message.
pub fn parsed<T, E: std::fmt::Display>(
    value: &Spanned<DeValue<'_>>,
    example: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<T, Bad> {
    parse(string(value, example)?).map_err(|e| Bad::at(value, e.to_string()))
}

/// An integer in `range` (checked by [`in_range`], as the flag is), in any TOML radix.
///
/// # Errors
/// `expected an integer (1..=64); found a string`, or the range message of [`in_range`].
pub fn integer(value: &Spanned<DeValue<'_>>, range: &RangeInclusive<u64>) -> Result<u64, Bad> {
    match value.get_ref() {
        DeValue::Integer(i) => {
            let n = i128::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| Bad::at(value, format!("{} is not a whole number", i.as_str())))?;
            in_range(n, range).map_err(|e| Bad::at(value, e))
        }
        other => Err(Bad::at(value, format!("expected an integer ({}); found {}", range_text(range), kind(other)))),
    }
}

/// [`integer`] for a setting kept as `u32` (`range` should fit in it).
///
/// # Errors
/// As [`integer`], and `N is out of range` for a number past `u32::MAX`.
pub fn integer_u32(value: &Spanned<DeValue<'_>>, range: &RangeInclusive<u64>) -> Result<u32, Bad> {
    let n = integer(value, range)?;
    u32::try_from(n).map_err(|_| Bad::at(value, format!("{n} is out of range")))
}

/// `true` or `false`.
///
/// # Errors
/// `expected true or false; found a string`.
pub fn boolean(value: &Spanned<DeValue<'_>>) -> Result<bool, Bad> {
    match value.get_ref() {
        DeValue::Boolean(b) => Ok(*b),
        other => Err(Bad::at(value, format!("expected true or false; found {}", kind(other)))),
    }
}

/// An absolute path (the file is read from any working directory).
///
/// # Errors
/// As [`nonempty`], and `"media" is a relative path; write it absolute, e.g. "/media"`.
pub fn absolute_path(value: &Spanned<DeValue<'_>>, example: &str) -> Result<PathBuf, Bad> {
    let text = nonempty(value, example)?;
    let p = PathBuf::from(text);
    if !p.is_absolute() {
        return Err(Bad::at(value, format!("{text:?} is a relative path; write it absolute, e.g. \"/{text}\"")));
    }
    Ok(p)
}

// ---- The document: positions, syntax errors, and the problems found. ----

/// A document being checked: its text, where its lines start, the spans of its syntax errors,
/// and the problems found so far.
#[derive(Debug)]
pub struct Doc<'t> {
    text: &'t str,
    line_starts: Vec<usize>,
    damaged: Vec<Range<usize>>,
    problems: Vec<Problem>,
}

impl<'t> Doc<'t> {
    /// Parses `text`, recording every syntax error as a problem (`TOML syntax: …`); the table holds
    /// what could be recovered.
    pub fn parse(text: &'t str) -> (Doc<'t>, Spanned<DeTable<'t>>) {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect::<Vec<_>>();
        let (root, errors) = DeTable::parse_recoverable(text);
        let mut doc = Doc { text, line_starts, damaged: Vec::new(), problems: Vec::new() };
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            doc.report(span.clone(), None, format!("TOML syntax: {}", e.message()));
            doc.damaged.push(span);
        }
        (doc, root)
    }

    /// Line and column (from 1, the column in characters) of byte `offset`.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line.saturating_sub(1)];
        (line, self.text[start..offset].chars().count() + 1)
    }

    /// Records a problem at the start of `span` (bytes of the text) for `key` (dotted, e.g.
    /// `init.fleet_name`; `None` for no key).
    pub fn report(&mut self, span: Range<usize>, key: Option<&str>, message: String) {
        let (line, column) = self.position(span.start);
        self.problems.push(Problem { line: Some(line), column: Some(column), key: key.map(str::to_owned), message });
    }

    /// Whether a syntax error lies in or touches `span` (its value is what recovery made of it,
    /// and is not checked further).
    pub fn is_damaged(&self, span: &Range<usize>) -> bool {
        self.damaged.iter().any(|d| d.start <= span.end && span.start <= d.end)
    }

    /// `Ok` when nothing was found.
    ///
    /// # Errors
    /// The problems in file order, at most [`PROBLEMS_MAX`]: past that, the last one counts the
    /// rest (`51 more problems not listed`, with no line).
    pub fn finish(mut self) -> Result<(), Vec<Problem>> {
        if self.problems.is_empty() {
            return Ok(());
        }
        self.problems.sort_by_key(|p| (p.line, p.column));
        if self.problems.len() > PROBLEMS_MAX {
            let more = self.problems.len() - (PROBLEMS_MAX - 1);
            self.problems.truncate(PROBLEMS_MAX - 1);
            self.problems.push(Problem::whole_file(format!("{more} more problems not listed")));
        }
        Err(self.problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters_from_one() {
        let (doc, _) = Doc::parse("a = 1\nbé = 2\n\nc = 3");
        assert_eq!(doc.position(0), (1, 1));
        assert_eq!(doc.position(6), (2, 1));
        // Byte 10 is the `=` after "bé " (4 bytes, 3 characters).
        assert_eq!(doc.position(10), (2, 4));
        assert_eq!(doc.position(14), (3, 1));
        assert_eq!(doc.position(15), (4, 1));
        assert_eq!(doc.position(1000), (4, 6));
    }
}
