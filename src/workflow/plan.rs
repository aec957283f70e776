//! What the workflow derives from the configuration once per engine
//! (`Formats`: schemas and rendered prompt templates per kind) and once per
//! topic when its outline is known (`DraftPlan`: the instructions and draft
//! schema every write, review and revise job of the topic shares).
//!
//! Owns: the caching of prompt text and schemas. Must not: do I/O or know
//! about actors; `config` stays plain data and knows nothing of this.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use super::decide::Policy;
use super::prompts::{self, RenderedPrompts};
use super::schema::{self, StructuredFormat};
use super::Outline;
use crate::config::{Config, KindConfig};

/// One kind's schemas and rendered templates.
pub struct KindPlan {
    pub config: KindConfig,
    pub rendered: RenderedPrompts,
    pub outline_format: Arc<StructuredFormat>,
}

/// Structured-output schemas and prompt templates, built once from the
/// config.
pub struct Formats {
    pub kind_names: Vec<String>,
    pub route: Arc<StructuredFormat>,
    /// The router's prompt instructions (config-only, so built once).
    pub router_instructions: Arc<str>,
    pub review: Arc<StructuredFormat>,
    kinds: BTreeMap<String, Arc<KindPlan>>,
    /// For a kind name the config does not know (kinds are validated at
    /// submit; a journal from an older config may still name one).
    fallback: Arc<KindPlan>,
}

impl KindPlan {
    fn new(config: &Config, kind: &KindConfig) -> KindPlan {
        KindPlan {
            config: kind.clone(),
            rendered: prompts::render_kind(config, kind),
            outline_format: Arc::new(schema::outline_format(kind)),
        }
    }
}

impl Formats {
    pub fn new(config: &Config) -> Formats {
        let kind_names = config.kind_names();
        Formats {
            route: Arc::new(schema::route_format(&kind_names)),
            router_instructions: prompts::router_instructions(config).into(),
            review: Arc::new(schema::review_format_for(config.llm.steps.review.max_output_tokens)),
            kinds: config.kinds.iter().map(|(n, k)| (n.clone(), Arc::new(KindPlan::new(config, k)))).collect(),
            fallback: Arc::new(KindPlan::new(config, &KindConfig::default())),
            kind_names,
        }
    }

    pub fn kind(&self, name: &str) -> &Arc<KindPlan> {
        self.kinds.get(name).unwrap_or(&self.fallback)
    }
}

/// The workflow policy of a config, for `decide`.
pub fn policy(config: &Config) -> Policy {
    Policy {
        route_with_model: config.workflow.route && config.kinds.len() > 1,
        default_kind: config.workflow.default_kind.clone(),
        max_revisions: config.workflow.max_revisions,
        approval_kinds: config
            .kinds
            .iter()
            .filter(|(_, k)| k.require_approval)
            .map(|(n, _)| n.clone())
            .collect::<BTreeSet<_>>(),
    }
}

/// What every draft step of a topic derives from its kind and outline,
/// built once when the outline is known: the rules text of the writer,
/// reviewer and reviser prompts and, for a `structured_draft` kind, the
/// draft schema. Shared by the topic's write, review and revise jobs.
pub struct DraftPlan {
    pub kind_name: String,
    pub kind: Arc<KindPlan>,
    pub outline: Outline,
    pub writer_instructions: Arc<str>,
    pub reviewer_instructions: Arc<str>,
    /// Built on the first revision: most topics never need it.
    reviser_instructions: OnceLock<Arc<str>>,
    pub format: Option<Arc<StructuredFormat>>,
}

impl DraftPlan {
    pub fn new(kind_name: &str, kind: Arc<KindPlan>, outline: Outline) -> Arc<DraftPlan> {
        let k = &kind.config;
        let writer_rules = prompts::writer_rules(k, &outline);
        Arc::new(DraftPlan {
            kind_name: kind_name.to_string(),
            writer_instructions: prompts::writer_instructions(&kind.rendered, &writer_rules),
            reviewer_instructions: prompts::reviewer_instructions(&kind.rendered, &prompts::review_rules(k, &outline)),
            reviser_instructions: OnceLock::new(),
            format: k.structured_draft.then(|| Arc::new(schema::draft_format(k, &outline))),
            outline,
            kind,
        })
    }

    pub fn reviser_instructions(&self) -> &Arc<str> {
        self.reviser_instructions.get_or_init(|| {
            prompts::reviser_instructions(&self.kind.rendered, &prompts::writer_rules(&self.kind.config, &self.outline))
        })
    }
}
