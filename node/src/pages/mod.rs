//! Pages: the leader's projector turns commits into published site versions
//! ([`projection`]), every node installs the versions its log commits ([`follow`]) and
//! serves them ([`serve`]); [`bundle`] loads a folder of templates into a site.

pub mod bundle;
pub mod follow;
pub mod projection;
pub mod serve;
