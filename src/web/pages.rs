//! The console's pages as maud templates: layout, topic list, topic page,
//! login, error.
//!
//! Owns: what each page shows and its markup. Every value is escaped by
//! maud except the output of `render::markdown` (sanitised) — nothing else
//! is written with `PreEscaped`. Links carry topic ids only. Must not: call
//! the engine (the router gathers the data), emit inline script or style
//! (the CSP forbids both), or depend on JavaScript for anything but live
//! updates.

use maud::{html, Markup, DOCTYPE};

use super::render;
use crate::state::{StepError, TopicState, TopicStatus, TopicSummary};
use crate::workflow::{Draft, Review};

/// One row of the topic list.
pub struct ListRow {
    pub summary: TopicSummary,
    /// Input + output tokens, when known.
    pub tokens: Option<u64>,
}

pub struct SubmitForm<'a> {
    pub kinds: &'a [String],
    pub default_variants: u32,
    pub max_topic_chars: usize,
}

fn layout(title: &str, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Scriptorium" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Scriptorium" }
                    nav {
                        a href="/" { "Topics" }
                        a href="/?status=awaiting_approval" { "Awaiting approval" }
                        a href="/#submit" { "Submit" }
                    }
                    span #live-status .off { "live updates off" }
                }
                (main)
            }
        }
    }
}

fn status_badge(status: TopicStatus) -> Markup {
    html! { span class={ "status s-" (status.as_str()) } data-status=(status.as_str()) { (status.as_str()) } }
}

/// "42s", "5m", "3h 4m", "2d".
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86_400),
    }
}

fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

pub fn list_page(
    rows: &[ListRow],
    filter: Option<TopicStatus>,
    total: usize,
    now_ms: u64,
    csrf: &str,
    form: &SubmitForm<'_>,
) -> Markup {
    let main = html! {
        main #live data-live="list" {
            h1 { "Topics" }
            form.filter method="get" action="/" {
                label for="status-filter" { "Status " }
                select #status-filter name="status" {
                    option value="" selected[filter.is_none()] { "all" }
                    @for s in TopicStatus::ALL {
                        option value=(s.as_str()) selected[filter == Some(s)] { (s.as_str()) }
                    }
                }
                " "
                button type="submit" { "Filter" }
                @if rows.len() < total {
                    span.note { " showing " (rows.len()) " of " (total) }
                }
            }
            @if rows.is_empty() {
                p.empty { "No topics" @if let Some(s) = filter { " with status " (s.as_str()) } "." }
            } @else {
                table.topics {
                    thead { tr { th { "Topic" } th { "Status" } th { "Kind" } th.num { "Best score" } th.num { "Tokens" } th.num { "Age" } } }
                    tbody {
                        @for row in rows {
                            @let s = &row.summary;
                            tr data-topic=(s.id) {
                                td.topic { a href={ "/topics/" (s.id) } { (s.topic) } }
                                td { (status_badge(s.status)) @if let Some(step) = &s.step { @if !s.status.is_terminal() { " " span.step { (step) } } } }
                                td { (s.kind.as_deref().unwrap_or("—")) }
                                td.num { @if let Some(score) = s.best_score { (score) "/10" } @else { "—" } }
                                td.num { @if let Some(t) = row.tokens { (t) } @else { "—" } }
                                td.num { (age(now_ms.saturating_sub(s.submitted_at_ms))) }
                            }
                        }
                    }
                }
            }
        }
        section #submit .card {
            h2 { "Submit a topic" }
            form method="post" action="/submit" {
                input type="hidden" name="csrf" value=(csrf);
                label for="topic" { "Topic" }
                textarea #topic name="topic" rows="2" required maxlength=(form.max_topic_chars) {}
                div.row {
                    span {
                        label for="kind" { "Kind " }
                        select #kind name="kind" {
                            option value="" { "let the router decide" }
                            @for k in form.kinds { option value=(k) { (k) } }
                        }
                    }
                    span {
                        label for="variants" { "Variants " }
                        input #variants type="number" name="variants" min="1" max="16" value=(form.default_variants);
                    }
                    span {
                        input #require_approval type="checkbox" name="require_approval" value="1";
                        label for="require_approval" { " Require approval" }
                    }
                }
                button #submit-topic type="submit" { "Submit" }
            }
        }
    };
    layout("Topics", main)
}

fn review_block(review: Option<&Review>) -> Markup {
    html! {
        @match review {
            None => p.pending { "Not reviewed yet." },
            Some(r) => div.review {
                p.score {
                    span.scorenum { (r.score) "/10" }
                    @if r.approved { span.ok { " approved by the reviewer" } } @else { span.no { " not approved" } }
                }
                @if !r.issues.is_empty() {
                    h5 { "Issues" }
                    ul.issues { @for i in &r.issues { li { (i) } } }
                }
                @if !r.suggestions.is_empty() {
                    h5 { "Suggestions" }
                    ul.suggestions { @for s in &r.suggestions { li { (s) } } }
                }
            },
        }
    }
}

fn step_error(e: &StepError) -> Markup {
    html! { span.failure { (e.step.as_str()) ": " code { (e.kind.as_str()) } " — " (e.message) } }
}

fn draft_details(label: &str, draft: &Draft, open: bool) -> Markup {
    html! {
        details.draft open[open] {
            summary { (label) " (" (draft.words) " words)" }
            article.markdown { (render::markdown(&draft.markdown)) }
        }
    }
}

pub fn topic_page(st: &TopicState, now_ms: u64, csrf: &str) -> Markup {
    let chosen_draft = st.chosen_variant.and_then(|i| st.variants.iter().find(|v| v.index == i)?.draft.as_ref());
    let main = html! {
        main #live data-live="topic" data-topic=(st.id) {
            p.crumbs { a href="/" { "← all topics" } }
            h1.topic-title { (st.topic) }
            dl.meta {
                dt { "Status" } dd #topic-status { (status_badge(st.status)) @if let Some(step) = &st.step { @if !st.status.is_terminal() { " " span.step { (step) } } } }
                dt { "Kind" } dd { (st.route.as_deref().or(st.requested_kind.as_deref()).unwrap_or("—")) }
                dt { "Variants" } dd { (st.variants_requested) }
                dt { "Approval" } dd { @if st.require_approval { "required" } @else { "not required" } }
                dt { "Tokens" } dd { (st.usage.input_tokens) " in · " (st.usage.output_tokens) " out · " (st.usage.llm_calls) " calls" }
                dt { "Submitted" } dd { (age(now_ms.saturating_sub(st.submitted_at_ms))) " ago"
                    @if let Some(f) = st.finished_at_ms { " · took " (duration(f.saturating_sub(st.submitted_at_ms))) } }
                dt { "Id" } dd { code { (st.id) } }
            }
            @if let Some(e) = &st.error {
                div.error #topic-error { strong { "Failed. " } (step_error(e)) }
            }
            @if st.status == TopicStatus::AwaitingApproval {
                section.card.decide #decide {
                    h2 { "Your decision" }
                    p { "Read the draft below, then approve it or send it back to the reviser with a note." }
                    div.row {
                        form #approve-form method="post" action={ "/topics/" (st.id) "/approve" } {
                            input type="hidden" name="csrf" value=(csrf);
                            label for="approve-note" { "Note (optional)" }
                            textarea #approve-note name="note" rows="2" {}
                            button #approve type="submit" { "Approve" }
                        }
                        form #reject-form method="post" action={ "/topics/" (st.id) "/reject" } {
                            input type="hidden" name="csrf" value=(csrf);
                            label for="reject-note" { "What should change?" }
                            textarea #reject-note name="note" rows="2" required {}
                            button #reject .secondary type="submit" { "Reject with note" }
                        }
                    }
                }
            }
            @if let Some(f) = &st.final_draft {
                section.card #final {
                    h2 { "Final draft" }
                    p.note { "From " (f.source) " · score " (f.review.score) "/10" @if f.review.approved { " · approved by the reviewer" } }
                    article.markdown #final-draft { (render::markdown(&f.draft.markdown)) }
                }
            } @else if let Some(d) = st.revisions.last().map(|r| &r.draft).or(chosen_draft) {
                section.card #current {
                    h2 { "Current draft" }
                    p.note { @if let Some(r) = st.revisions.last() { "Revision " (r.number) } @else { "Chosen variant" } }
                    article.markdown { (render::markdown(&d.markdown)) }
                }
            }
            @if let Some(o) = &st.outline {
                section #outline {
                    h2 { "Outline" }
                    p.outline-title { (o.title) }
                    ol { @for s in &o.sections { li { (s) } } }
                }
            }
            @if !st.variants.is_empty() {
                section #variants {
                    h2 { "Variants" }
                    @if let (Some(i), Some(reason)) = (st.chosen_variant, &st.chosen_reason) {
                        p.chosen-reason #chosen-reason { "Chose variant " (i) ": " (reason) }
                    }
                    div.variants {
                        @for v in &st.variants {
                            @let chosen = st.chosen_variant == Some(v.index);
                            article.variant.chosen[chosen] data-variant=(v.index) {
                                h3 { "Variant " (v.index) @if chosen { " " span.badge { "chosen" } } }
                                (review_block(v.review.as_ref()))
                                @if let Some(e) = &v.error { p.error { (step_error(e)) } }
                                @if let Some(d) = &v.draft { (draft_details("Draft", d, false)) }
                            }
                        }
                    }
                }
            }
            @if !st.revisions.is_empty() {
                section #revisions {
                    h2 { "Revisions" }
                    @for (n, r) in st.revisions.iter().enumerate() {
                        @let before = if n == 0 { chosen_draft } else { st.revisions.get(n - 1).map(|p| &p.draft) };
                        article.revision data-revision=(r.number) {
                            h3 { "Revision " (r.number) }
                            @if let Some(note) = &r.human_note { p.human-note { "Editor's note: " q { (note) } } }
                            (review_block(r.review.as_ref()))
                            @if let Some(b) = before {
                                h4 { "Changes against " @if n == 0 { "the chosen variant" } @else { "revision " (st.revisions[n - 1].number) } }
                                (render::diff(&b.markdown, &r.draft.markdown))
                            }
                            (draft_details("Draft", &r.draft, false))
                        }
                    }
                }
            }
            @if !st.approvals.is_empty() {
                section #approvals {
                    h2 { "Decisions" }
                    ul { @for a in &st.approvals {
                        li { (format!("{:?}", a.decision).to_lowercase()) " " (age(now_ms.saturating_sub(a.at_ms))) " ago"
                            @if let Some(n) = &a.note { ": " q { (n) } } }
                    } }
                }
            }
            section #timeline {
                h2 { "Timeline" }
                @if st.timings.is_empty() {
                    p.empty { "No step has finished yet." }
                } @else {
                    table.timeline {
                        thead { tr { th { "Step" } th { "Variant" } th { "Revision" } th.num { "Attempts" } th.num { "Started" } th.num { "Took" } } }
                        tbody { @for t in &st.timings {
                            tr.retried[t.attempts > 1] {
                                td { (t.step.as_str()) }
                                td { @if let Some(v) = t.variant { (v) } }
                                td { @if let Some(r) = t.revision { (r) } }
                                td.num { (t.attempts) }
                                td.num { "+" (duration(t.started_ms.saturating_sub(st.submitted_at_ms))) }
                                td.num { (duration(t.finished_ms.saturating_sub(t.started_ms))) }
                            }
                        } }
                    }
                }
                @let failures: Vec<&StepError> = st.variants.iter().filter_map(|v| v.error.as_ref()).chain(st.error.as_ref()).collect();
                @if !failures.is_empty() {
                    h3 { "Failures" }
                    ul.failures { @for e in failures { li { (step_error(e)) } } }
                }
                p.note { "Attempts above 1 are retried calls (rate limits, server errors, timeouts or output that failed its gate)." }
            }
        }
    };
    layout(&st.topic, main)
}

pub fn login_page(csrf: &str, wrong: bool) -> Markup {
    let main = html! {
        main.narrow {
            h1 { "Sign in" }
            p { "This console needs the daemon's " code { "web_token" } "." }
            @if wrong { p.error { "That token is not right." } }
            form method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label for="token" { "Token" }
                input #token type="password" name="token" required autocomplete="current-password";
                button type="submit" { "Sign in" }
            }
        }
    };
    layout("Sign in", main)
}

pub fn error_page(code: &str, message: &str) -> Markup {
    let main = html! {
        main.narrow {
            h1 { "Could not do that" }
            p.error #error { code { (code) } ": " (message) }
            p { a href="/" { "Back to the topics" } }
        }
    };
    layout("Error", main)
}
