//! Crops a configured region of interest and, by default, converts it to gray.
//!
//! Config: `x`, `y`, `width`, `height` (pixels; the box is clipped to the
//! image) and `grayscale` (`true` or `false`, default `true`).

use lineside_plugin_sdk::Config;
use lineside_plugin_sdk::pre::{Image, Metadata, Preprocessor, Region};

struct RoiCrop {
    roi: Region,
    grayscale: bool,
}

impl Preprocessor for RoiCrop {
    fn init(c: Config) -> Result<Self, String> {
        let roi = Region {
            x: c.parse_or("x", 0)?,
            y: c.parse_or("y", 0)?,
            width: c.parse_or("width", u32::MAX)?,
            height: c.parse_or("height", u32::MAX)?,
        };
        Ok(RoiCrop { roi, grayscale: c.parse_or("grayscale", true)? })
    }

    fn process(&self, image: Image, _: &Metadata) -> Result<Image, String> {
        if self.grayscale { image.crop_gray(self.roi) } else { image.crop(self.roi) }
    }
}

lineside_plugin_sdk::preprocessor!(RoiCrop);
