//! Pages: the leader's projector turns commits into published site versions
//! ([`projection`]), every node installs the versions its log commits ([`follow`]) and
//! serves them ([`serve`]); [`janitor`] removes deleted sites' files after their retention;
//! [`bundle`] loads a folder of templates into a site; [`export`] makes a ZIP of a version;
//! [`purge`] tells a CDN which URLs a new served version changed.

pub mod bundle;
pub mod export;
pub mod follow;
pub mod gc;
pub mod janitor;
pub mod preview;
pub mod projection;
pub mod purge;
pub mod serve;
