//! The nearest valid key to a misspelt one, for "did you mean" hints.

/// The candidate closest to `word` by Damerau-Levenshtein distance (optimal
/// string alignment), if close enough to be a likely typo: at most a third
/// of the word's length, and at least 1 edit always allowed.
pub(crate) fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`;
/// `-` and `_` count as the same letter, so `max_surge` finds `max-surge`.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let fold = |c: char| {
        if c == '_' {
            '-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    let a: Vec<char> = a.chars().map(fold).collect();
    let b: Vec<char> = b.chars().map(fold).collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_the_key_it_was_meant_to_be() {
        let keys = ["replicas", "image", "command", "max-surge"];
        assert_eq!(nearest("replics", &keys), Some("replicas"));
        assert_eq!(nearest("imgae", &keys), Some("image"));
        assert_eq!(nearest("max_surge", &keys), Some("max-surge"));
        assert_eq!(nearest("volumes", &keys), None);
    }

    #[test]
    fn swapped_neighbours_cost_one_edit() {
        assert_eq!(distance("ab", "ba"), 1);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
    }
}
