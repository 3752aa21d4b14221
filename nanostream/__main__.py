import sys

from .cli.main import main
from .process import skip_collection_at_exit

skip_collection_at_exit()
sys.exit(main())
