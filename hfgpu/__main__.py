import sys

from hfgpu.cli import main

sys.exit(main())
