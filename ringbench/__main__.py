from ringbench import console_main

raise SystemExit(console_main())
