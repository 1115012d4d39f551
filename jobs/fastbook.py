"""fastbook's baseline as the book writes it (one process, Pillow, torch.stack): the benchmark's
reference. Prints correct predictions per evaluation class as JSON.

    python jobs/fastbook.py --data runs/bench/data-x10 [--classes 3 7]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist37.fastbook import main, parse_args  # noqa: E402

if __name__ == "__main__":
    main(parse_args())
