from facegen.cli import main

main()
