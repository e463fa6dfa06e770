//! The one font of every figure: DejaVu Sans, bundled (its licence in `assets/`), so a PNG
//! renders the same on a server without fonts as on a workstation.

use std::sync::Once;

use plotters::style::FontStyle;

/// The family name figures ask for; it resolves to the bundled font.
pub const FAMILY: &str = "sans-serif";

static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font with plotters (once per process).
pub fn ensure_fonts() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            let registered = plotters::style::register_font(FAMILY, style, DEJAVU_SANS);
            assert!(registered.is_ok(), "the bundled DejaVu Sans does not parse");
        }
    });
}
