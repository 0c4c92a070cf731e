//! Text from the other side (hosts, bundles) made safe to print on an
//! operator's terminal: control characters and invisible reordering marks
//! are written out as escapes, so they can neither move the cursor, recolour
//! the screen, set a window title, nor forge a line or a label.

/// `text` as it may reach an operator's terminal: control characters
/// (escape sequences, line breaks) written out as escapes. Hosts choose
/// their agent version and labels, and bundles their member names; none of
/// it may move the cursor, recolour the screen or forge a row.
pub fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(unsafe_on_a_terminal) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if unsafe_on_a_terminal(c) {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Control characters, and the invisible marks that reorder or hide text
/// (bidirectional overrides and isolates, zero-width characters).
pub fn unsafe_on_a_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Like [`clean`], keeping line breaks: for messages of several lines.
pub fn clean_lines(text: &str) -> String {
    text.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(clean("web-01"), "web-01");
        assert_eq!(clean("0.1.0\"} 1\n\u{1b}[2Jx"), "0.1.0\"} 1\\n\\u{1b}[2Jx");
        assert_eq!(clean_lines("a\n\u{1b}b"), "a\n\\u{1b}b");
        assert_eq!(
            clean("w\u{202e}eb"),
            "w\\u{202e}eb",
            "a right-to-left override"
        );
    }
}
