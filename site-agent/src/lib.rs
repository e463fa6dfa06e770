//! The site agent's configuration as a library: `coordinator simulate` and the end-to-end tests
//! write their site agents' `site.toml` by serializing [`config::SiteConfig`], the type the
//! agent reads, rather than formatting TOML by hand.

pub mod config;
