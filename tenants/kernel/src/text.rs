//! Small text rules shared by every layer: characters a name may not hold,
//! and addresses kept out of logs.

/// Whether `c` is invisible or changes the direction of the text around it
/// (Unicode format characters: bidi overrides and isolates, zero-width
/// spaces and joiners, the byte-order mark, tags). In a name they make one
/// text look like another ("Acme\u{202e}gnp.exe"), so names refuse them.
/// Listed here rather than pulled from a Unicode-properties crate: the set
/// of such characters is small and stable.
pub fn is_invisible(c: char) -> bool {
    INVISIBLE.iter().any(|(from, to)| (*from..=*to).contains(&c))
}

/// The characters of [`is_invisible`], as inclusive ranges.
const INVISIBLE: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{034F}', '\u{034F}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180F}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{FFF9}', '\u{FFFB}'),
    ('\u{E0000}', '\u{E007F}'),
];

/// A regular expression (for the OpenAPI document) that matches the texts
/// a name or description field accepts: no control characters (but tabs
/// and line breaks when `multiline`), no invisible ones, and something
/// other than white space when `non_blank`. Length is checked apart.
pub fn text_pattern(multiline: bool, non_blank: bool) -> String {
    let mut class =
        String::from(if multiline { r"\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F" } else { r"\x00-\x1F\x7F-\x9F" });
    for (from, to) in INVISIBLE {
        class.push(*from);
        if from != to {
            class.push('-');
            class.push(*to);
        }
    }
    if non_blank { format!(r"^[^{class}]*[^{class}\s][^{class}]*$") } else { format!("^[^{class}]*$") }
}

/// `text` with every word that looks like an email address replaced, for
/// logging errors that quote one (SMTP replies often name the recipient).
pub fn redact_addresses(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|word| {
            if word.contains('@') {
                if word.ends_with(char::is_whitespace) { "[address] " } else { "[address]" }
            } else {
                word
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_names_the_same_characters() {
        let pattern = text_pattern(false, true);
        for (from, to) in INVISIBLE {
            assert!(pattern.contains(*from) && pattern.contains(*to));
            assert!(is_invisible(*from) && is_invisible(*to));
        }
        assert!(!is_invisible('a') && !is_invisible('\u{2070}'));
        assert!(text_pattern(true, false).starts_with(r"^[^\x00-\x08\x0B"));
    }
}
