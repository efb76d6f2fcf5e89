//! Errors: [`TemplateError`] for problems in a site's content (reported, never fatal) and
//! [`ProjectError`] for failures that stop a projection (the store, the machine).

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::source::SourceError;

/// A problem in the site's content, as site status reports it (`{ template, line, message }`).
/// The page keeps its last good version; the rest of the site is published as usual.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct TemplateError {
    /// The template at fault (for an error inside an included template, that one). For a bad
    /// route or asset tuple, or a site limit, the tuple at fault, e.g. `_routes//{key}`.
    pub template: String,
    /// 1-based line in `template`, when known.
    pub line: Option<usize>,
    pub message: String,
    /// The page whose render failed, when a render failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl TemplateError {
    pub(crate) fn new(template: impl Into<String>, message: impl Into<String>) -> Self {
        TemplateError {
            template: template.into(),
            line: None,
            message: message.into(),
            path: None,
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.template)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(path) = &self.path {
            write!(f, " (rendering {path})")?;
        }
        Ok(())
    }
}

/// Why a projection stopped. The projector's state is reset, so the next projection renders
/// everything again; nothing was published.
#[derive(Debug, Error)]
pub enum ProjectError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("starting render threads: {0}")]
    Threads(#[source] std::io::Error),
    /// The render pool could not finish the batch (its threads are gone).
    #[error("render pool: {0}")]
    Pool(String),
}
