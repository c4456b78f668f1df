"""Speech synthesis with espeak-ng for the synthetic corpus, the demo and the tests (no downloads needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from dawn import DawnError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We talked about the weather, the mountains and a long walk by the river.",
    "Every morning she opens the window and listens to the birds singing outside.",
    "My favourite colour is blue, but I also like a warm shade of orange.",
    "Could you read the next page aloud, slowly and clearly, for everyone here?",
    "Numbers like seven, twelve and forty two are easy to remember.",
    "The little boat drifted across the bay while the sun went down.",
]
VOICES = ["en", "en-us", "en-gb-x-rp", "en+m3", "en+f2", "en+f4", "en-us+m7", "en+f3"]


def synthesize_speech(text: str, out_wav: str | Path, voice: str = "en", words_per_minute: int = 160,
                      pitch: int = 50) -> Path:
    """Write `text` spoken by espeak-ng to a 22.05 kHz mono WAV file and return its path."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DawnError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    out_wav = Path(out_wav)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "-w", str(out_wav), text]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not out_wav.exists():
        raise DawnError(f"espeak-ng failed for voice {voice!r}: {result.stderr.strip()}")
    return out_wav
