//! Validation gates: the only way a model's text becomes a typed step output.
//!
//! Each gate parses strictly and checks the rules the prompt stated. A gate
//! failure is a retryable failure of that step; its message is fed back to
//! the model on the next attempt, so it says exactly what was wrong.

use super::schema::{draft_keys, REVIEW_ITEMS_MAX, SHORT_TEXT_MAX};
use super::{Draft, Outline, Review, Route};
use crate::config::KindConfig;

/// Why a model output was rejected. One line, safe to show the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GateError(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, GateError> {
    Err(GateError(msg.into()))
}

/// Removes one surrounding markdown code fence (```json … ```), which chat
/// models add even when told not to.
fn unfence(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        if let Some(body_start) = rest.find('\n') {
            let body = &rest[body_start + 1..];
            if let Some(inner) = body.trim_end().strip_suffix("```") {
                return inner.trim();
            }
        }
    }
    t
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, GateError> {
    let body = unfence(text);
    if body.is_empty() {
        return fail(format!("empty output, expected a JSON {what} object"));
    }
    serde_json::from_str(body).map_err(|e| GateError(format!("output is not a valid {what} JSON object: {e}")))
}

fn one_line_text(value: &str, field: &str, max_chars: u64) -> Result<String, GateError> {
    let v = value.trim();
    if v.is_empty() {
        return fail(format!("`{field}` must not be empty"));
    }
    if v.contains(['\n', '\r']) {
        return fail(format!("`{field}` must be a single line"));
    }
    if v.chars().count() as u64 > max_chars {
        return fail(format!("`{field}` is longer than {max_chars} characters"));
    }
    Ok(v.to_string())
}

pub fn check_route(text: &str, kinds: &[String]) -> Result<Route, GateError> {
    let route: Route = parse_json(text, "route")?;
    let kind = route.kind.trim();
    if !kinds.iter().any(|k| k == kind) {
        return fail(format!("`kind` must be one of: {} (got `{}`)", kinds.join(", "), route.kind));
    }
    Ok(Route { kind: kind.to_string() })
}

/// A section that repeats an earlier one (ignoring case) is dropped, not
/// rejected: small models echo the topic as every heading, and no schema in
/// the strict subset can forbid repeats. The count is checked after that.
pub fn check_outline(text: &str, kind: &KindConfig) -> Result<Outline, GateError> {
    let outline: Outline = parse_json(text, "outline")?;
    let title = one_line_text(&outline.title, "title", SHORT_TEXT_MAX)?;
    if outline.sections.len() as u32 > kind.max_sections {
        return fail(format!(
            "`sections` must have between {} and {} entries (got {})",
            kind.min_sections,
            kind.max_sections,
            outline.sections.len()
        ));
    }
    let mut sections = Vec::with_capacity(outline.sections.len());
    for (i, s) in outline.sections.iter().enumerate() {
        let s = one_line_text(s.trim_start_matches('#'), &format!("sections[{i}]"), 80)?;
        if s.eq_ignore_ascii_case("conclusion") {
            return fail("`sections` must not include a Conclusion; it is added automatically");
        }
        if !sections.iter().any(|p: &String| p.eq_ignore_ascii_case(&s)) {
            sections.push(s);
        }
    }
    let n = sections.len() as u32;
    if n < kind.min_sections {
        return fail(format!(
            "`sections` must have between {} and {} distinct entries (got {n})",
            kind.min_sections, kind.max_sections
        ));
    }
    Ok(Outline { title, sections })
}

/// Words as the rule states them: whitespace-separated, heading markers
/// (`#`, `##`, …) not counted.
pub fn count_words(markdown: &str) -> u32 {
    draft_shape(markdown).0
}

/// The word count (`count_words`) and the `## ` headings
/// (`level2_headings`) of a draft, in one pass over an ASCII text: the
/// draft gate needs both, on every draft.
fn draft_shape(markdown: &str) -> (u32, Vec<&str>) {
    if !markdown.is_ascii() {
        let words = markdown.split_whitespace().filter(|w| !w.chars().all(|c| c == '#')).count() as u32;
        return (words, level2_headings(markdown).collect());
    }
    // Heading markers are words of only `#`, and headings start with one;
    // there are few `#` bytes, so find them directly: subtract the marker
    // tokens from the word starts, and read a heading where a `## ` opens
    // a line.
    let bytes = markdown.as_bytes();
    let mut hash_words = 0;
    let mut headings = Vec::new();
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'#') {
        let at = i + offset;
        let token_start = at == 0 || is_ascii_space(bytes[at - 1]);
        let mut end = at;
        while end < bytes.len() && bytes[end] == b'#' {
            end += 1;
        }
        if token_start && (end == bytes.len() || is_ascii_space(bytes[end])) {
            hash_words += 1;
        }
        if end - at == 2 && bytes.get(end) == Some(&b' ') && opens_line(bytes, at) {
            let rest = &markdown[end + 1..];
            let line = rest.split('\n').next().unwrap_or_default();
            headings.push(line.trim());
        }
        i = end;
    }
    (ascii_word_starts(bytes) - hash_words, headings)
}

/// Whether only whitespace (not a line break) precedes `at` on its line:
/// what `str::lines` + `trim_start` leave at the start of a line.
fn opens_line(bytes: &[u8], at: usize) -> bool {
    bytes[..at].iter().rev().take_while(|&&b| b != b'\n').all(|&b| is_ascii_space(b))
}

/// `char::is_whitespace` on ASCII.
fn is_ascii_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// Word starts (a non-space byte after a space or at the start) in ASCII
/// text, eight bytes per step (SWAR). Every byte is below 0x80, so adding a
/// constant below 0x80 to a byte never carries into its neighbour: bit 7 of
/// each byte of `x + (0x80 - n)` says "byte >= n".
fn ascii_word_starts(bytes: &[u8]) -> u32 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Bit 7 of each byte set where the byte is ASCII whitespace:
    // 0x09..=0x0d, or 0x20.
    let spaces = |x: u64| {
        let at_least_tab = x + ONES * (0x80 - 0x09);
        let above_cr = x + ONES * (0x80 - 0x0e);
        let blank = x ^ (ONES * 0x20);
        let non_blank = blank + ONES * 0x7f;
        ((at_least_tab & !above_cr) | !non_blank) & HIGH
    };
    let mut chunks = bytes.chunks_exact(8);
    // Bit 7 of the previous byte's space flag; the start counts as a space.
    let mut carry = 0x80u64;
    let mut starts = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let space = spaces(u64::from_le_bytes(word));
        let space_before = (space << 8) | carry;
        starts += (space_before & !space & HIGH).count_ones();
        carry = space >> 56;
    }
    let mut space_before = carry != 0;
    for &b in chunks.remainder() {
        let space = is_ascii_space(b);
        starts += u32::from(space_before && !space);
        space_before = space;
    }
    starts
}

/// The `## ` headings of a markdown text, trimmed, in order.
pub fn level2_headings(markdown: &str) -> impl Iterator<Item = &str> {
    markdown.lines().filter_map(|l| l.trim_start().strip_prefix("## ")).map(str::trim)
}

pub fn check_draft(text: &str, outline: &Outline, kind: &KindConfig) -> Result<Draft, GateError> {
    let markdown = unfence(text);
    if markdown.is_empty() {
        return fail("empty draft");
    }
    let (words, headings) = draft_shape(markdown);
    if words < kind.min_words || words > kind.max_words {
        return fail(format!(
            "the draft has {words} words; it must have between {} and {} words",
            kind.min_words, kind.max_words
        ));
    }
    let missing: Vec<&str> = outline
        .sections
        .iter()
        .map(|s| s.trim())
        .filter(|s| !headings.iter().any(|h| h.eq_ignore_ascii_case(s)))
        .collect();
    if !missing.is_empty() {
        return fail(format!("missing `## ` headings for: {}", missing.join("; ")));
    }
    match headings.last() {
        Some(last) if last.eq_ignore_ascii_case("conclusion") => {}
        _ => return fail("the last `## ` heading must be `## Conclusion`"),
    }
    Ok(Draft { markdown: markdown.into(), words })
}

/// Renders a structured draft: `# title`, then `## heading` and its text for
/// every section. The code owns the structure: a line of model text that
/// starts with `#` loses its markers, so the text cannot add or reorder
/// headings.
pub fn render_sections(title: &str, sections: &[(&str, &str)]) -> String {
    let mut out = format!("# {title}\n\n");
    for (heading, text) in sections {
        out.push_str("## ");
        out.push_str(heading);
        out.push('\n');
        for line in text.trim().lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('#') {
                out.push_str(trimmed.trim_start_matches('#').trim_start());
            } else {
                out.push_str(line.trim_end());
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// Gate for a structured draft (`kinds.NAME.structured_draft`): a JSON
/// object with exactly the keys of `schema::draft_keys`, each a non-empty
/// string. The rendered markdown then passes the same `check_draft` as a
/// markdown answer, so word counts are checked the same way.
pub fn check_structured_draft(text: &str, outline: &Outline, kind: &KindConfig) -> Result<Draft, GateError> {
    let object: serde_json::Map<String, serde_json::Value> = parse_json(text, "draft")?;
    let keys = draft_keys(outline);
    let expected = || keys.iter().map(|(k, _)| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    if let Some(extra) = object.keys().find(|k| !keys.iter().any(|(key, _)| key == *k)) {
        return fail(format!("unexpected key `{extra}`; the keys must be exactly: {}", expected()));
    }
    let mut sections = Vec::with_capacity(keys.len());
    for (key, heading) in &keys {
        match object.get(key) {
            Some(serde_json::Value::String(body)) if !body.trim().is_empty() => {
                sections.push((heading.as_str(), body.as_str()))
            }
            Some(serde_json::Value::String(_)) => {
                return fail(format!("`{key}` (the text under `## {heading}`) is empty"))
            }
            Some(_) => return fail(format!("`{key}` must be a string")),
            None => return fail(format!("missing key `{key}` (the text under `## {heading}`)")),
        }
    }
    check_draft(&render_sections(&outline.title, &sections), outline, kind)
}

/// The review gate. `approval_min_score` is code's half of the verdict
/// (`workflow.approval_min_score`): an approval with a lower score is
/// recorded as not approved, with the reason added to `issues`, so the
/// reviser is told why.
pub fn check_review(text: &str, approval_min_score: u8) -> Result<Review, GateError> {
    let review: Review = parse_json(text, "review")?;
    if review.score > 10 {
        return fail(format!("`score` must be between 0 and 10 (got {})", review.score));
    }
    let clean = |items: &[String], field: &str| -> Result<Vec<String>, GateError> {
        if items.len() as u64 > REVIEW_ITEMS_MAX {
            return fail(format!("`{field}` has more than {REVIEW_ITEMS_MAX} entries"));
        }
        Ok(items.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    };
    let mut issues = clean(&review.issues, "issues")?;
    let approved = review.approved && review.score >= approval_min_score;
    if review.approved && !approved {
        issues.push(format!(
            "the score {} is below the approval threshold {approval_min_score}: raise the quality",
            review.score
        ));
    }
    Ok(Review { approved, score: review.score, issues, suggestions: clean(&review.suggestions, "suggestions")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind() -> KindConfig {
        KindConfig { min_words: 10, max_words: 40, min_sections: 2, max_sections: 3, ..KindConfig::default() }
    }

    fn outline() -> Outline {
        Outline { title: "T".into(), sections: vec!["Alpha".into(), "Beta Part".into()] }
    }

    #[test]
    fn word_count_fast_path_matches_the_rule() {
        let slow = |text: &str| text.split_whitespace().filter(|w| !w.chars().all(|c| c == '#')).count() as u32;
        for text in [
            "",
            "# T\n\n## A\none two",
            "a\tb\x0bc\u{0c}d",
            "### ## x #y# ##",
            "  lead  trail  ",
            "é ## mot",
            "## A\r\n ## B \n x ## C\n##D\n###E\n\t## F\n## ",
        ] {
            assert_eq!(count_words(text), slow(text), "{text:?}");
            assert_eq!(draft_shape(text).1, level2_headings(text).collect::<Vec<_>>(), "{text:?}");
        }
        // Every ASCII byte, at every offset across the 8-byte steps.
        let alphabet: Vec<u8> = (0u8..0x80).collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let text: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Mostly spaces and letters, so words of every length
                    // occur, and heading-like line starts.
                    match state % 5 {
                        0 => " ",
                        1 => {
                            std::str::from_utf8(&alphabet[(state >> 8) as usize % alphabet.len()..][..1]).unwrap_or("?")
                        }
                        2 => ["\t", "\n", "#", "\r", "\x0b", "\x0c"][(state >> 8) as usize % 6],
                        3 => ["\n## ", "\n ## ", "## ", "\n###", "\r\n"][(state >> 8) as usize % 5],
                        _ => "w",
                    }
                })
                .collect();
            assert_eq!(count_words(&text), slow(&text), "{text:?}");
            let (_, headings) = draft_shape(&text);
            assert_eq!(headings, level2_headings(&text).collect::<Vec<_>>(), "{text:?}");
        }
    }

    #[test]
    fn route_gate() {
        let kinds = vec!["article".to_string(), "tutorial".to_string()];
        assert_eq!(check_route(r#"{"kind":"tutorial"}"#, &kinds).unwrap().kind, "tutorial");
        assert_eq!(check_route("```json\n{\"kind\":\"article\"}\n```", &kinds).unwrap().kind, "article");
        for bad in ["", "{", r#"{"kind":"poem"}"#, r#"{"kinds":"article"}"#, "[]", r#"{"kind":1}"#] {
            assert!(check_route(bad, &kinds).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn outline_gate() {
        let ok = check_outline(r#"{"title":" A title ","sections":["One","Two"]}"#, &kind()).unwrap();
        assert_eq!(ok.title, "A title");
        // Repeats are dropped; what is left must still be enough.
        let dup = check_outline(r#"{"title":"x","sections":["One","Two","one"]}"#, &kind()).unwrap();
        assert_eq!(dup.sections, vec!["One", "Two"]);
        let err = check_outline(r#"{"title":"x","sections":["One","one ","ONE"]}"#, &kind()).unwrap_err();
        assert!(err.0.contains("distinct entries (got 1)"), "{err}");
        let bad = [
            r#"{"title":"","sections":["One","Two"]}"#,
            r#"{"title":"x","sections":["One"]}"#,
            r#"{"title":"x","sections":["a","b","c","d"]}"#,
            r#"{"title":"x","sections":["One",""]}"#,
            r#"{"title":"x","sections":["One","one"]}"#,
            r#"{"title":"x","sections":["One","Conclusion"]}"#,
            r#"{"title":"x\ny","sections":["One","Two"]}"#,
            "{\"title\":\"x\u{1}\",\"sections\":[\"One\",\"Two\"]}",
            r#"{"title":"x"}"#,
            "not json",
        ];
        for b in bad {
            assert!(check_outline(b, &kind()).is_err(), "{b:?}");
        }
    }

    #[test]
    fn draft_gate() {
        let good =
            "# T\n\n## Alpha\none two three four\n\n## beta part\nfive six seven\n\n## Conclusion\neight nine ten\n";
        let d = check_draft(good, &outline(), &kind()).unwrap();
        // "T" counts; "#", "##" do not.
        assert_eq!(d.words, 1 + 1 + 4 + 2 + 3 + 1 + 3);
        let cases = [
            ("too short", "## Alpha\n## Beta Part\n## Conclusion\n"),
            ("missing section", "## Alpha\none two three four five six seven eight nine ten\n## Conclusion\nx"),
            ("no conclusion", "## Alpha\none two three four five six\n## Beta Part\nseven eight nine ten"),
            (
                "conclusion not last",
                "## Conclusion\n## Alpha\none two three four five six\n## Beta Part\nseven eight nine ten",
            ),
            (
                "level 3 is not level 2",
                "### Alpha\n## Beta Part\none two three four five six seven eight\n## Conclusion\nx",
            ),
            ("empty", "   "),
        ];
        for (why, text) in cases {
            assert!(check_draft(text, &outline(), &kind()).is_err(), "{why}");
        }
        let long = format!("## Alpha\n## Beta Part\n## Conclusion\n{}", "w ".repeat(50));
        assert!(check_draft(&long, &outline(), &kind()).unwrap_err().0.contains("between 10 and 40"));
    }

    #[test]
    fn structured_draft_renders_and_passes_the_draft_gate() {
        let text = r#"{"01_alpha":"one two three","02_beta_part":"four five\n## sneaky heading\nsix","03_conclusion":"seven eight nine"}"#;
        let d = check_structured_draft(text, &outline(), &kind()).unwrap();
        assert_eq!(
            &*d.markdown,
            "# T\n\n## Alpha\none two three\n\n## Beta Part\nfour five\nsneaky heading\nsix\n\n## Conclusion\nseven eight nine"
        );
        assert_eq!(check_draft(&d.markdown, &outline(), &kind()).unwrap(), d);
        let bad = [
            ("not json", "## Alpha\ntext"),
            ("missing key", r#"{"01_alpha":"one two three four five six","03_conclusion":"seven eight nine"}"#),
            ("extra key", r#"{"01_alpha":"a b c d","02_beta_part":"e f g","03_conclusion":"h i j","x":"y"}"#),
            ("empty body", r#"{"01_alpha":"one two three four five six","02_beta_part":"  ","03_conclusion":"x y z"}"#),
            ("not a string", r#"{"01_alpha":1,"02_beta_part":"a b c d e f","03_conclusion":"x y z"}"#),
            ("too few words", r#"{"01_alpha":"a","02_beta_part":"b","03_conclusion":"c"}"#),
            (
                "raw control character",
                "{\"01_alpha\":\"a\u{1}b c d e\",\"02_beta_part\":\"b c d\",\"03_conclusion\":\"c d e\"}",
            ),
        ];
        for (why, text) in bad {
            assert!(check_structured_draft(text, &outline(), &kind()).is_err(), "{why}");
        }
        let words = check_structured_draft(bad[5].1, &outline(), &kind()).unwrap_err().0;
        assert!(words.contains("between 10 and 40 words"), "{words}");
    }

    #[test]
    fn review_gate() {
        let r = check_review(r#"{"approved":false,"score":6,"issues":[" a ",""],"suggestions":["b"]}"#, 7).unwrap();
        assert_eq!((r.score, r.issues.clone()), (6, vec!["a".to_string()]));
        // Code's threshold: an approval with a low score does not count.
        let low = r#"{"approved":true,"score":3,"issues":[],"suggestions":[]}"#;
        let r = check_review(low, 7).unwrap();
        assert!(!r.approved);
        assert!(r.issues[0].contains("below the approval threshold 7"), "{:?}", r.issues);
        assert!(check_review(low, 0).unwrap().approved);
        assert!(check_review(low, 3).unwrap().approved);
        for bad in [
            r#"{"approved":true,"score":11,"issues":[],"suggestions":[]}"#,
            r#"{"approved":true,"score":-1,"issues":[],"suggestions":[]}"#,
            r#"{"approved":true,"score":5}"#,
            r#"{"approved":"yes","score":5,"issues":[],"suggestions":[]}"#,
            r#"{"approved":true,"score":5.5,"issues":[],"suggestions":[]}"#,
            "",
        ] {
            assert!(check_review(bad, 7).is_err(), "{bad:?}");
        }
    }
}
