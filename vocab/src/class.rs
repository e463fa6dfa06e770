//! Classes (DESIGN.md §1.1): a class belongs to one site and is a region of that site's label
//! maps; its id `<site>/<name>` keeps two sites' "liver" apart.

use serde::{Deserialize, Serialize};

/// A site's class: the set of label values whose voxels belong to it. What a site configures
/// (`[data].classes`) and registers with in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRegion {
    pub name: String,
    pub labels: Vec<u32>,
}

impl ClassRegion {
    pub fn contains(&self, label: u16) -> bool {
        self.labels.contains(&(label as u32))
    }
}

/// One output channel of the global model: what `Welcome`, the coordinator's setup and
/// checkpoints, and `model.json` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalClass {
    /// Output channel index of the class in the global model.
    pub index: u32,
    /// [`class_id`] of `site` and `name`.
    pub id: String,
    pub site: String,
    pub name: String,
    /// Label values of the site's label maps that form this class (a region).
    pub labels: Vec<u32>,
}

impl GlobalClass {
    /// Channel `index` of the global model: `site`'s class `region`.
    pub fn new(index: u32, site: &str, region: &ClassRegion) -> Self {
        GlobalClass {
            index,
            id: class_id(site, &region.name),
            site: site.to_string(),
            name: region.name.clone(),
            labels: region.labels.clone(),
        }
    }

    /// The site's view of the class: its name and label region.
    pub fn region(&self) -> ClassRegion {
        ClassRegion { name: self.name.clone(), labels: self.labels.clone() }
    }
}

/// The id of `site`'s class `name`: `<site>/<name>`. Site names contain no `/` (certificate
/// names), so the first `/` separates the two.
pub fn class_id(site: &str, name: &str) -> String {
    format!("{site}/{name}")
}

/// `(site, name)` of a class id built by [`class_id`]; `None` when `id` has no `/` or an empty
/// part.
pub fn parse_class_id(id: &str) -> Option<(&str, &str)> {
    id.split_once('/').filter(|(site, name)| !site.is_empty() && !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_malformed_ones_do_not_parse() {
        let id = class_id("liver", "liver_tumour");
        assert_eq!(id, "liver/liver_tumour");
        assert_eq!(parse_class_id(&id), Some(("liver", "liver_tumour")));
        // A class name may hold a `/`; the site (a certificate name) cannot.
        assert_eq!(parse_class_id("a/b/c"), Some(("a", "b/c")));
        for bad in ["liver", "/x", "x/", ""] {
            assert_eq!(parse_class_id(bad), None, "{bad:?}");
        }
        let region = ClassRegion { name: "x".into(), labels: vec![1, 2] };
        let class = GlobalClass::new(3, "s", &region);
        assert_eq!((class.index, class.id.as_str(), class.site.as_str()), (3, "s/x", "s"));
        assert_eq!(class.region(), region);
        assert!(region.contains(2) && !region.contains(3));
    }
}
