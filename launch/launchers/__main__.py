import sys

from launch.launchers import main

sys.exit(main())
