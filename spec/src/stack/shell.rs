//! Splits a command given as one string into words the way a POSIX shell
//! (and Compose) does: whitespace separates, quotes group, no expansion.

/// `python3 -c 'print("hi")'` → `["python3", "-c", "print(\"hi\")"]`.
/// Single quotes are literal; in double quotes a backslash escapes `"`,
/// `\`, `$` and `` ` ``; outside quotes it escapes any character.
pub(crate) fn split(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated single quote in {text:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unterminated double quote in {text:?}")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated double quote in {text:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_group_words_and_backslashes_escape() {
        assert_eq!(
            split(r#"python3 -c 'print("hi")' "a b" c\ d '' x"#).unwrap(),
            ["python3", "-c", "print(\"hi\")", "a b", "c d", "", "x"]
        );
        assert_eq!(
            split(r#"echo "say \"hi\" \n""#).unwrap(),
            ["echo", "say \"hi\" \\n"]
        );
        assert_eq!(split("  ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_unterminated_quote_is_refused() {
        assert!(split("echo 'hi").unwrap_err().contains("single quote"));
        assert!(split("echo \"hi").unwrap_err().contains("double quote"));
    }
}
