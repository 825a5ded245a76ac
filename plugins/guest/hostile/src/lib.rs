//! A deliberately hostile preprocessor for the sandbox tests. `mode` in its
//! config picks the attack; every one must fail only its own request.

use std::hint::black_box;

use lineside_plugin_sdk::Config;
use lineside_plugin_sdk::pre::{Image, Metadata, PixelFormat, Preprocessor};

struct Hostile {
    mode: String,
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    // black_box keeps the call from becoming a loop.
    black_box(recurse(black_box(depth + 1))) + 1
}

impl Preprocessor for Hostile {
    fn init(c: Config) -> Result<Self, String> {
        Ok(Hostile { mode: c.get("mode").unwrap_or("none").to_string() })
    }

    fn process(&self, image: Image, _: &Metadata) -> Result<Image, String> {
        match self.mode.as_str() {
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "panic" => panic!("hostile plugin panicked on purpose"),
            "recurse" => Err(format!("unreachable: {}", recurse(0))),
            "huge" => {
                // 16 MB of pixels: well inside the memory cap, over the output limit the tests set.
                Ok(Image { width: 4000, height: 4000, format: PixelFormat::Gray8, pixels: vec![0; 16_000_000] })
            }
            "bad-shape" => Ok(Image { width: 100, height: 100, format: PixelFormat::Rgb8, pixels: vec![0; 10] }),
            "read-file" => match std::fs::read("/etc/hostname") {
                Ok(bytes) => Err(format!("SANDBOX BREACH: read {} bytes from the host", bytes.len())),
                Err(e) => Err(format!("open /etc/hostname: {e}")),
            },
            "socket" => match std::net::TcpStream::connect("127.0.0.1:80") {
                Ok(_) => Err("SANDBOX BREACH: opened a socket".to_string()),
                Err(e) => Err(format!("connect 127.0.0.1:80: {e}")),
            },
            "env" => match std::env::vars().next() {
                Some((k, _)) => Err(format!("SANDBOX BREACH: saw environment variable {k}")),
                None => Err("no environment variables visible".to_string()),
            },
            _ => Ok(image),
        }
    }
}

lineside_plugin_sdk::preprocessor!(Hostile);
