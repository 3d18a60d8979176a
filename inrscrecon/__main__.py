from inrscrecon.cli import main

raise SystemExit(main())
