from moellava.demo.run import main

main()
