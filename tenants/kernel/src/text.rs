//! Small text rules shared by every layer: characters a name may not hold,
//! and addresses kept out of logs.

/// Whether `c` is invisible or changes the direction of the text around it
/// (Unicode format characters: bidi overrides and isolates, zero-width
/// spaces and joiners, the byte-order mark, tags). In a name they make one
/// text look like another ("Acme\u{202e}gnp.exe"), so names refuse them.
/// Listed here rather than pulled from a Unicode-properties crate: the set
/// of such characters is small and stable.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
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
