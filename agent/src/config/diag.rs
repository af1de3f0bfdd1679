//! Diagnostics: a problem in a configuration file, with the file, line and column it is at.
//!
//! Positions come from byte spans the TOML parser records; they are turned into 1-based
//! lines and columns (columns count characters, not bytes, so they match an editor).

use std::fmt;
use std::ops::Range;

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration is refused.
    Error,
    /// Accepted, but weakens protection (e.g. fencing disabled); logged loudly.
    Warning,
}

/// One problem found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file (or other origin) the text came from.
    pub origin: String,
    /// 1-based line; 0 when the problem has no position (e.g. the file cannot be read).
    pub line: usize,
    /// 1-based column in characters; 0 when there is no position.
    pub column: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.line == 0 {
            write!(f, "{}: {sev}: {}", self.origin, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {sev}: {}",
                self.origin, self.line, self.column, self.message
            )
        }
    }
}

/// Turns byte offsets of one text into positions.
pub(crate) struct SourceMap<'a> {
    text: &'a str,
    origin: &'a str,
    /// Byte offset at which each line starts.
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(text: &'a str, origin: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceMap {
            text,
            origin,
            line_starts,
        }
    }

    /// 1-based line and column of byte offset `at` (clamped to the text).
    pub(crate) fn position(&self, at: usize) -> (usize, usize) {
        let at = at.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= at);
        let start = self.line_starts[line - 1];
        // Offsets from the parser fall on char boundaries; be safe anyway.
        let column = self
            .text
            .get(start..at)
            .map_or(at - start, |s| s.chars().count())
            + 1;
        (line, column)
    }

    pub(crate) fn diagnostic(
        &self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = self.position(span.start);
        Diagnostic {
            severity,
            origin: self.origin.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = 2\n\nz";
        let m = SourceMap::new(text, "t.toml");
        let cases = [
            (0, (1, 1)),  // start
            (4, (1, 5)),  // the 1
            (6, (2, 1)),  // b
            (10, (2, 4)), // '=' after a 2-byte char: column 4
            (14, (3, 1)), // empty line
            (15, (4, 1)), // z
            (99, (4, 2)), // past the end: clamped
        ];
        for (at, want) in cases {
            assert_eq!(m.position(at), want, "offset {at}");
        }
    }
}
