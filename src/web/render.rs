//! Turning untrusted text into safe HTML: drafts (markdown) and diffs.
//!
//! Owns: the one path model-written markdown takes to the page
//! (pulldown-cmark without extensions → ammonia with a narrow allow-list),
//! and line diffs between drafts (similar). Must not: hand any model or
//! topic text to the page without escaping or sanitising it; everything
//! else on the page goes through maud, which escapes.

use std::collections::HashSet;

use maud::{html, Markup, PreEscaped};
use similar::{ChangeTag, TextDiff};

/// Markdown → HTML → sanitised. Raw HTML in the markdown (`<script>`,
/// `onerror=`), `javascript:` links and images are removed by ammonia;
/// links that remain get `rel="noopener noreferrer nofollow"`.
pub fn markdown(md: &str) -> Markup {
    let parser = pulldown_cmark::Parser::new_ext(md, pulldown_cmark::Options::empty());
    let mut raw = String::with_capacity(md.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut raw, parser);
    let mut cleaner = ammonia::Builder::default();
    cleaner
        .rm_tags(["img"])
        .url_schemes(HashSet::from(["http", "https", "mailto"]))
        .link_rel(Some("noopener noreferrer nofollow"));
    PreEscaped(cleaner.clean(&raw).to_string())
}

/// Lines of context kept around each change.
const CONTEXT_LINES: usize = 2;

/// A line diff of `old` → `new`, as hunks with a little context. Every
/// line is escaped by maud.
pub fn diff(old: &str, new: &str) -> Markup {
    let diff = TextDiff::from_lines(old, new);
    let (mut added, mut removed) = (0usize, 0usize);
    for change in diff.iter_all_changes() {
        match change.tag() {
            ChangeTag::Insert => added += 1,
            ChangeTag::Delete => removed += 1,
            ChangeTag::Equal => {}
        }
    }
    let groups = diff.grouped_ops(CONTEXT_LINES);
    html! {
        p.diffstat { span.add { "+" (added) } " " span.del { "−" (removed) } " lines" }
        @if groups.is_empty() {
            p.empty { "No changes." }
        } @else {
            pre.diff {
                @for (i, group) in groups.iter().enumerate() {
                    @if i > 0 { span.hunk { "⋯\n" } }
                    @for op in group {
                        @for change in diff.iter_changes(op) {
                            @let line = change.value().trim_end_matches('\n');
                            @match change.tag() {
                                ChangeTag::Insert => span.add { "+ " (line) "\n" },
                                ChangeTag::Delete => span.del { "- " (line) "\n" },
                                ChangeTag::Equal => span.same { "  " (line) "\n" },
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_markdown_is_inert() {
        let md = "# T\n\n<script>window.pwned=1</script>\n\n<img src=x onerror=\"window.pwned=2\">\n\n\
                  [click](javascript:window.pwned=3) and [ok](https://example.org)\n\n\
                  <a href=\"javascript:alert(1)\" onclick=\"x()\">raw</a>";
        let out = markdown(md).into_string();
        let lower = out.to_ascii_lowercase();
        for bad in ["<script", "onerror", "javascript:", "onclick", "<img"] {
            assert!(!lower.contains(bad), "{bad} survived: {out}");
        }
        assert!(out.contains("<h1>T</h1>"), "{out}");
        assert!(out.contains("href=\"https://example.org\""), "{out}");
    }

    #[test]
    fn diff_marks_lines_and_escapes() {
        let out = diff("a\nb\nc\n", "a\n<b>\nc\n").into_string();
        assert!(out.contains("+1"), "{out}");
        assert!(out.contains("- b"), "{out}");
        assert!(out.contains("+ &lt;b&gt;"), "{out}");
        assert!(diff("same\n", "same\n").into_string().contains("No changes."));
    }
}
